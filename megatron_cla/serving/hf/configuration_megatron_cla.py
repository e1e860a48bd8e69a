"""Configuration of a Cross-Layer Attention (CLA) decoder exported by megatron-cla.

Self-contained: this file is copied next to ``config.json`` and loaded with
``trust_remote_code=True``; it needs only ``transformers``.

The decoder is Megatron-Core's GPT layer stack as megatron-cla trains it: pre-norm layers of
self-attention and an MLP, RoPE (rotate-half, full head; optionally with Llama 3.1's scaling of
the long wavelengths), optional per-head q/k norms applied before RoPE, biases only on the q/k/v
projections and only if ``qkv_bias``. Layers listed in ``cla_producer_layers`` compute
keys and values; every other layer (a consumer) computes only queries and attends over the K/V of
the nearest producer before it, so only producer layers hold a KV cache.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

_NORMS = ("rmsnorm", "layernorm")
_ACTIVATIONS = ("silu", "gelu")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class MegatronCLAConfig(PretrainedConfig):
    """Hyper-parameters of ``MegatronCLAForCausalLM``.

    Args:
        vocab_size: rows of the embedding and output layer (Megatron's padded vocabulary).
        tokenizer_vocab_size: ids the tokenizer can produce; rows from here to ``vocab_size``
            are padding and are never generated (default: ``vocab_size``).
        hidden_size: model width.
        intermediate_size: MLP width (per branch for the gated MLP).
        num_hidden_layers: decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: K/V heads (1: MQA, ``num_attention_heads``: MHA, else GQA).
        head_dim: size of one head (default ``hidden_size // num_attention_heads``).
        hidden_act: ``silu`` or ``gelu`` (exact, erf-based).
        mlp_gated: gated MLP (``act(gate) * up``: SwiGLU with ``silu``) instead of ``act(up)``.
        norm_type: ``rmsnorm`` or ``layernorm`` (LayerNorm has a bias, RMSNorm does not).
        norm_eps: epsilon of every norm.
        qk_norm: per-head norms (of ``norm_type``) on queries and keys, before RoPE.
        qkv_bias: the query, key and value projections have biases (Qwen2).
        rope_theta: RoPE base.
        rope_llama3_scaling: Llama 3.1's RoPE scaling (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``), or None for plain RoPE.
        max_position_embeddings: positions the model is meant to serve.
        cla_producer_layers: 0-based layers that compute K/V (must include 0); default: all.
        tie_word_embeddings: the output layer reuses the input embedding.
        initializer_range: std of the normal initialisation of fresh weights.
        megatron_cla: how the model was trained (``arch``, ``hybrid_layer_pattern``, the
            ``hf_architecture`` it was imported from), kept so that the model can be imported
            back into the same Megatron model family.
    """

    model_type = "megatron_cla"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 8064,
        tokenizer_vocab_size: Optional[int] = None,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 1,
        head_dim: Optional[int] = None,
        hidden_act: str = "silu",
        mlp_gated: bool = True,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        rope_llama3_scaling: Optional[dict[str, float]] = None,
        max_position_embeddings: int = 256,
        cla_producer_layers: Optional[list[int]] = None,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        megatron_cla: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.mlp_gated = mlp_gated
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.qk_norm = qk_norm
        self.qkv_bias = qkv_bias
        self.rope_theta = rope_theta
        self.rope_llama3_scaling = dict(rope_llama3_scaling) if rope_llama3_scaling else None
        self.max_position_embeddings = max_position_embeddings
        if cla_producer_layers is None:
            cla_producer_layers = range(num_hidden_layers)
        self.cla_producer_layers = [int(p) for p in cla_producer_layers]
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.megatron_cla = dict(megatron_cla or {})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check()

    def _check(self) -> None:
        layers, producers = self.num_hidden_layers, self.cla_producer_layers
        problems = []
        if producers != sorted(set(producers)) or not producers or producers[0] != 0:
            problems.append(f"cla_producer_layers={producers} must be sorted, unique, start at 0")
        if producers and producers[-1] >= layers:
            problems.append(f"cla_producer_layers={producers} exceed num_hidden_layers={layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.norm_type not in _NORMS:
            problems.append(f"norm_type={self.norm_type!r} is not one of {_NORMS}")
        if self.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r} is not one of {_ACTIVATIONS}")
        if not 0 < self.tokenizer_vocab_size <= self.vocab_size:
            problems.append(
                f"tokenizer_vocab_size={self.tokenizer_vocab_size} must be in 1..vocab_size="
                f"{self.vocab_size}"
            )
        scaling = self.rope_llama3_scaling
        if scaling is not None and set(scaling) != set(_LLAMA3_KEYS):
            problems.append(f"rope_llama3_scaling={scaling} must have the keys {_LLAMA3_KEYS}")
        if problems:
            raise ValueError("invalid MegatronCLAConfig: " + "; ".join(problems))

    @property
    def cla_kv_source(self) -> list[int]:
        """For every layer, the producer layer whose K/V it attends over (itself if a producer)."""
        source, producers = [], set(self.cla_producer_layers)
        for layer in range(self.num_hidden_layers):
            source.append(layer if layer in producers else source[-1])
        return source

    @property
    def kv_sharing_modes(self) -> list[str]:
        """transformers' KV-sharing hint: ``reuse`` layers get no cache of their own."""
        return ["own" if s == i else "reuse" for i, s in enumerate(self.cla_kv_source)]


__all__ = ["MegatronCLAConfig"]
