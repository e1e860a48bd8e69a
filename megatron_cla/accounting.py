"""What CLA saves: KV-cache bytes, parameters and FLOPs of a decoder, computed from its config.

Conventions: a multiply-add is 2 FLOPs; attention-score FLOPs count the full (non-causal)
``s x s`` product, as Megatron's and the PaLM/Chinchilla accounting do; training FLOPs are 3x
forward (backward = 2x forward); activation recomputation is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_cla.sharing import KVSharing

__all__ = ["DecoderShape", "kv_cache_bytes_per_token", "decoder_params", "flops_per_token"]


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

    @classmethod
    def from_config(cls, config: Any, sharing: KVSharing) -> DecoderShape:
        """Shape of a Megatron ``TransformerConfig`` with the given sharing."""
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
        )


def kv_cache_bytes_per_token(shape: DecoderShape, bytes_per_element: int = 2) -> int:
    """2 (K and V) x KV heads x head dim x KV layers x bytes (the paper's formula)."""
    return 2 * shape.groups * shape.head_dim * shape.sharing.num_kv_layers * bytes_per_element


def _attention_weights(shape: DecoderShape, producer: bool) -> int:
    q = shape.heads * shape.head_dim
    kv = 2 * shape.groups * shape.head_dim if producer else 0
    return shape.hidden * (q + kv) + q * shape.hidden  # in-projection + linear_proj


def _mlp_weights(shape: DecoderShape) -> int:
    return shape.hidden * shape.ffn * (2 if shape.gated else 1) + shape.ffn * shape.hidden


def decoder_params(shape: DecoderShape) -> int:
    """Weights of the decoder's linear layers (no norms, biases or embeddings)."""
    total = 0
    for layer in range(1, shape.num_layers + 1):
        total += _attention_weights(shape, shape.sharing.is_producer(layer)) + _mlp_weights(shape)
    return total


def flops_per_token(
    shape: DecoderShape, seq_len: int, vocab_size: int, training: bool = True
) -> int:
    """FLOPs per token of the decoder plus the output layer, for sequences of ``seq_len``."""
    forward = 2 * decoder_params(shape) + 2 * shape.hidden * vocab_size
    # QK^T and attention x V: each 2 * seq_len * (heads * head_dim) per token per layer
    forward += shape.num_layers * 2 * 2 * seq_len * shape.heads * shape.head_dim
    return 3 * forward if training else forward
