"""What CLA saves: KV-cache bytes, parameters and FLOPs of a decoder, computed from its config.

Conventions: a multiply-add is 2 FLOPs; attention-score FLOPs count the full (non-causal)
``s x s`` product, as Megatron's and the PaLM/Chinchilla accounting do; training FLOPs are 3x
forward (backward = 2x forward); activation recomputation is not counted.

A hybrid stack (``HybridModel``) is counted layer by layer from its pattern: ``*`` attention
(producers with K/V projections, consumers without), ``-`` MLP, ``E`` MoE (every expert, plus the
router), ``M`` Mamba-2 (Megatron's ``MambaMixer`` shapes). The KV cache counts producer attention
layers only; Mamba layers keep a fixed-size state per sequence instead (:func:`mamba_state_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_cla.sharing import KVSharing

__all__ = [
    "DecoderShape",
    "MambaShape",
    "kv_cache_bytes_per_token",
    "decoder_params",
    "params_per_layer",
    "flops_per_token",
    "mamba_state_bytes",
]

MAMBA_CONV_WIDTH = 4
"""Megatron's Mamba-2 causal convolution width (``d_conv``)."""


@dataclass(frozen=True)
class MambaShape:
    """Sizes of a Mamba-2 layer (Megatron's ``MambaMixer``)."""

    d_inner: int
    heads: int
    head_dim: int
    groups: int
    state_dim: int

    @classmethod
    def from_config(cls, config: Any) -> MambaShape:
        """Megatron's defaults: ``d_inner = 2 x hidden`` unless ``mamba_num_heads`` is set."""
        head_dim = config.mamba_head_dim
        heads = config.mamba_num_heads or 2 * config.hidden_size // head_dim
        groups, state = config.mamba_num_groups, config.mamba_state_dim
        return cls(heads * head_dim, heads, head_dim, groups, state)

    @property
    def conv_channels(self) -> int:
        """Channels of the causal convolution (x, B and C)."""
        return self.d_inner + 2 * self.groups * self.state_dim

    def weights(self, hidden: int) -> int:
        """in_proj (z, x, B, C, dt) + conv1d + out_proj weights."""
        in_proj = hidden * (2 * self.d_inner + 2 * self.groups * self.state_dim + self.heads)
        return in_proj + self.conv_channels * MAMBA_CONV_WIDTH + self.d_inner * hidden


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that determine CLA's costs (read from a Megatron config)."""

    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    gated: bool
    bias: bool
    sharing: KVSharing
    layer_types: Optional[str] = None
    """A hybrid stack's pattern symbols (no ``|``); None for a GPT decoder."""
    experts: int = 0
    """Experts of every ``E`` layer."""
    expert_ffn: int = 0
    """Width of one expert's MLP."""
    expert_topk: int = 0
    """Experts each token runs through."""
    mamba: Optional[MambaShape] = None
    """Sizes of the ``M`` layers."""

    @classmethod
    def from_config(cls, config: Any, sharing: KVSharing) -> DecoderShape:
        """Shape of a Megatron ``TransformerConfig`` with the given sharing (over attention
        layers); a ``CLATransformerConfig`` with a ``hybrid_layer_pattern`` is a hybrid stack."""
        layout = getattr(config, "cla_hybrid_layout", None)
        types = None if layout is None else layout.layer_types
        return cls(
            num_layers=config.num_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            ffn=config.ffn_hidden_size,
            gated=bool(config.gated_linear_unit),
            bias=bool(config.add_bias_linear),
            sharing=sharing,
            layer_types=types,
            experts=config.num_moe_experts or 0,
            expert_ffn=config.moe_ffn_hidden_size or config.ffn_hidden_size,
            expert_topk=config.moe_router_topk if config.num_moe_experts else 0,
            mamba=MambaShape.from_config(config) if types and "M" in types else None,
        )

    @property
    def symbols(self) -> str:
        """One symbol per layer: the pattern, or ``*-`` per GPT layer (attention + MLP)."""
        return self.layer_types if self.layer_types is not None else "*-" * self.num_layers

    @property
    def attention_layers(self) -> int:
        """Layers with self-attention."""
        return self.symbols.count("*")


def kv_cache_bytes_per_token(shape: DecoderShape, bytes_per_element: int = 2) -> int:
    """2 (K and V) x KV heads x head dim x KV layers x bytes (the paper's formula)."""
    return 2 * shape.groups * shape.head_dim * shape.sharing.num_kv_layers * bytes_per_element


def mamba_state_bytes(
    shape: DecoderShape,
    tensor_parallel: int = 1,
    bytes_per_element: int = 2,
    layers: Optional[int] = None,
) -> int:
    """State of one sequence (any length) in ``layers`` (default: every) ``M`` layer(s) on one
    TP rank: the convolution window and the SSM state, as Megatron's paged context sizes it."""
    if shape.mamba is None:
        return 0
    m = shape.mamba
    conv = m.conv_channels // tensor_parallel * MAMBA_CONV_WIDTH
    ssm = m.heads // tensor_parallel * m.head_dim * m.state_dim
    count = shape.symbols.count("M") if layers is None else layers
    return count * (conv + ssm) * bytes_per_element


def _attention_weights(shape: DecoderShape, producer: bool) -> int:
    q = shape.heads * shape.head_dim
    kv = 2 * shape.groups * shape.head_dim if producer else 0
    return shape.hidden * (q + kv) + q * shape.hidden  # in-projection + linear_proj


def _mlp_weights(shape: DecoderShape, ffn: int) -> int:
    return shape.hidden * ffn * (2 if shape.gated else 1) + ffn * shape.hidden


def _layer_weights(shape: DecoderShape, symbol: str, attention: int, active: bool) -> int:
    """Weights of one layer; ``active``: only those a token runs through (top-k experts)."""
    if symbol == "*":
        return _attention_weights(shape, shape.sharing.is_producer(attention))
    if symbol == "-":
        return _mlp_weights(shape, shape.ffn)
    if symbol == "E":
        experts = shape.expert_topk if active else shape.experts
        return experts * _mlp_weights(shape, shape.expert_ffn) + shape.hidden * shape.experts
    if symbol == "M":
        return shape.mamba.weights(shape.hidden)
    raise ValueError(f"no parameter accounting for {symbol!r} layers (Gated DeltaNet)")


def _per_layer(shape: DecoderShape, active: bool) -> list[int]:
    weights, attention = [], 0
    for symbol in shape.symbols:
        attention += symbol == "*"
        weights.append(_layer_weights(shape, symbol, attention, active))
    return weights


def _weights(shape: DecoderShape, active: bool) -> int:
    return sum(_per_layer(shape, active))


def params_per_layer(shape: DecoderShape) -> list[int]:
    """:func:`decoder_params` of each layer (pattern symbol) in order."""
    return _per_layer(shape, active=False)


def decoder_params(shape: DecoderShape) -> int:
    """Weights of the decoder's linear (and Mamba convolution) layers, every expert included;
    no norms, biases, embeddings or Mamba's per-head scalars."""
    return _weights(shape, active=False)


def flops_per_token(
    shape: DecoderShape, seq_len: int, vocab_size: int, training: bool = True
) -> int:
    """FLOPs per token of the decoder plus the output layer, for sequences of ``seq_len``
    (MoE: the router and the top-k experts; Mamba: projections, convolution and Megatron's
    7 x d_inner x state scan estimate)."""
    forward = 2 * _weights(shape, active=True) + 2 * shape.hidden * vocab_size
    # QK^T and attention x V: each 2 * seq_len * (heads * head_dim) per token per layer
    forward += shape.attention_layers * 2 * 2 * seq_len * shape.heads * shape.head_dim
    if shape.mamba is not None:
        forward += shape.symbols.count("M") * 7 * shape.mamba.d_inner * shape.mamba.state_dim
    return 3 * forward if training else forward
