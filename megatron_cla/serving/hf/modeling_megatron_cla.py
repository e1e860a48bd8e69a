"""A Cross-Layer Attention (CLA) decoder for transformers, exported by megatron-cla.

Self-contained: this file is copied next to ``config.json`` and loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; it needs only ``torch``
and ``transformers``. It computes what Megatron-Core computes for the same weights (see
``configuration_megatron_cla.py`` for the architecture).

K/V hand-off: a producer layer projects keys and values, normalises and rotates the keys,
appends both to the KV cache under its own layer index and publishes the full (cached + new)
K/V in ``shared_kv``, a dict that lives for one forward pass. A consumer layer reads its
producer's entry from ``shared_kv`` and never touches the cache, so after a prefill the cache
holds the producer layers only: 1/S of a model without sharing.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_megatron_cla import MegatronCLAConfig

# transformers 5.20 renamed the cache argument and output field ``past_key_values`` to ``cache``.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class MegatronCLANorm(nn.Module):
    """RMSNorm (weight) or LayerNorm (weight and bias), computed in float32."""

    def __init__(self, size: int, norm_type: str, eps: float) -> None:
        super().__init__()
        self.norm_type, self.eps = norm_type, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if norm_type == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.bias is None:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        else:
            shape = (h.shape[-1],)
            h = F.layer_norm(h, shape, self.weight.float(), self.bias.float(), self.eps)
        return h.to(x.dtype)


def _norm(config: MegatronCLAConfig, size: int) -> MegatronCLANorm:
    return MegatronCLANorm(size, config.norm_type, config.norm_eps)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths longer than ``original / low_freq_factor`` are
    stretched by ``factor``, those shorter than ``original / high_freq_factor`` kept, and the
    band between interpolated smoothly."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class MegatronCLARotary(nn.Module):
    """Rotate-half RoPE over the whole head, as Megatron's ``RotaryEmbedding`` (frequencies are
    recomputed per call: cheap, and nothing to initialise when weights are loaded)."""

    def __init__(self, config: MegatronCLAConfig) -> None:
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.scaling = config.rope_llama3_scaling

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape [batch, 1, tokens, head_dim] for integer ``positions``."""
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device)
        inv_freq = 1.0 / (self.theta ** (steps / self.head_dim))
        if self.scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, self.scaling)
        freqs = positions.float()[..., None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return t * cos.to(t.dtype) + torch.cat((-second, first), dim=-1) * sin.to(t.dtype)


class MegatronCLAAttention(nn.Module):
    """Self-attention of a producer (Q, K, V) or a consumer (Q only) layer."""

    def __init__(self, config: MegatronCLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_source = config.cla_kv_source[layer_idx]
        self.produces_kv = self.kv_source == layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, d, bias = config.hidden_size, config.head_dim, config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.heads * d, bias=bias)
        if self.produces_kv:
            self.k_proj = nn.Linear(hidden, self.kv_heads * d, bias=bias)
            self.v_proj = nn.Linear(hidden, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, hidden, bias=False)
        self.q_norm = _norm(config, d) if config.qk_norm else None
        self.k_norm = _norm(config, d) if config.qk_norm and self.produces_kv else None

    def _heads(self, x: torch.Tensor, heads: int, norm: Optional[nn.Module]) -> torch.Tensor:
        x = x.view(*x.shape[:2], heads, self.head_dim)
        return (x if norm is None else norm(x)).transpose(1, 2)

    def _keys_values(
        self, hidden: torch.Tensor, rope: tuple, cache: Optional[Cache], shared_kv: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.produces_kv:
            return shared_kv[self.kv_source]
        keys = _rotate(self._heads(self.k_proj(hidden), self.kv_heads, self.k_norm), *rope)
        values = self._heads(self.v_proj(hidden), self.kv_heads, None)
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx)
        shared_kv[self.layer_idx] = (keys, values)
        return keys, values

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: Optional[Cache],
        shared_kv: dict,
    ) -> torch.Tensor:
        queries = _rotate(self._heads(self.q_proj(hidden), self.heads, self.q_norm), *rope)
        keys, values = self._keys_values(hidden, rope, cache, shared_kv)
        repeat = self.heads // self.kv_heads
        keys = keys.repeat_interleave(repeat, dim=1)
        values = values.repeat_interleave(repeat, dim=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:2], -1))


class MegatronCLAMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``."""

    def __init__(self, config: MegatronCLAConfig) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, ffn, bias=False) if config.mlp_gated else None
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.act = F.silu if config.hidden_act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MegatronCLADecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each with a residual connection."""

    def __init__(self, config: MegatronCLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = MegatronCLAAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.mlp = MegatronCLAMLP(config)

    def forward(self, hidden: torch.Tensor, *attention_args: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), *attention_args)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MegatronCLAPreTrainedModel(PreTrainedModel):
    config_class = MegatronCLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MegatronCLADecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MegatronCLANorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _positions(
    mask: Optional[torch.Tensor], past: int, batch: int, tokens: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens: counted over unpadded tokens when a mask is given."""
    if mask is None:
        return torch.arange(past, past + tokens, device=device).expand(batch, tokens)
    counted = mask.long().cumsum(-1) - 1
    return counted.clamp(min=0)[:, past : past + tokens]


def _attention_bias(
    mask: Optional[torch.Tensor], past: int, tokens: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive causal + padding mask [batch or 1, 1, tokens, past + tokens]."""
    keys = torch.arange(past + tokens, device=device)
    allowed = (keys[None, :] <= torch.arange(past, past + tokens, device=device)[:, None])[None]
    if mask is not None:
        allowed = allowed & mask[:, None, : past + tokens].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class MegatronCLAModel(MegatronCLAPreTrainedModel):
    """Embedding, the decoder layers and the final norm."""

    def __init__(self, config: MegatronCLAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = range(config.num_hidden_layers)
        self.layers = nn.ModuleList(MegatronCLADecoderLayer(config, i) for i in layers)
        self.norm = _norm(config, config.hidden_size)
        self.rotary = MegatronCLARotary(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        if cache is None and (self.config.use_cache if use_cache is None else use_cache):
            cache = DynamicCache(config=self.config)
        batch, tokens = hidden.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, past, batch, tokens, hidden.device)
        rope = self.rotary(position_ids)
        bias = _attention_bias(attention_mask, past, tokens, hidden.dtype, hidden.device)
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            hidden = layer(hidden, rope, bias, cache, shared_kv)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{_CACHE_FIELD: cache})


class MegatronCLAForCausalLM(MegatronCLAPreTrainedModel, GenerationMixin):
    """The decoder with its output layer (tied to the embedding unless the config says not)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegatronCLAConfig) -> None:
        super().__init__(config)
        self.model = MegatronCLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        past_key_values: Optional[Cache] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )


__all__ = [
    "MegatronCLAConfig",
    "MegatronCLAForCausalLM",
    "MegatronCLAModel",
    "MegatronCLAPreTrainedModel",
]
