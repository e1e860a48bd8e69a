"""The layout of Megatron's fused query/key/value projection (pure functions).

A producer's ``linear_qkv`` weight ``[rows, hidden]`` (and bias ``[rows]``) groups its rows per
K/V head: ``view(G, H/G + 2, d, ...)`` holds, for each of the G groups, its H/G query heads, then
its key head, then its value head (Megatron's layout; Megatron-Bridge's ``merge_qkv_weights``
writes the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cla.training.config import ModelConfig

__all__ = ["AttentionShape", "attention_shape", "join_qkv", "split_qkv"]


@dataclass(frozen=True)
class AttentionShape:
    """What the tensor layouts depend on."""

    num_heads: int
    """Query heads (H)."""
    num_groups: int
    """K/V heads (G)."""
    head_dim: int
    """Size of one head (d)."""
    gated_mlp: bool
    """``linear_fc1`` holds gate and up projections (SwiGLU)."""


def attention_shape(model: ModelConfig) -> AttentionShape:
    """The layouts of a launcher model's tensors."""
    return AttentionShape(
        num_heads=model.num_attention_heads,
        num_groups=model.num_query_groups,
        head_dim=model.head_dim or model.hidden_size // model.num_attention_heads,
        gated_mlp=model.swiglu,
    )


def split_qkv(fused: torch.Tensor, shape: AttentionShape) -> list[torch.Tensor]:
    """Q, K, V rows of a fused weight ``[rows, hidden]`` or bias ``[rows]``."""
    g, per_group, d = shape.num_groups, shape.num_heads // shape.num_groups, shape.head_dim
    rest = fused.shape[1:]
    grouped = fused.view(g, per_group + 2, d, *rest)
    return [
        grouped[:, :per_group].reshape(g * per_group * d, *rest),
        grouped[:, per_group].reshape(g * d, *rest),
        grouped[:, per_group + 1].reshape(g * d, *rest),
    ]


def join_qkv(parts: list[torch.Tensor], shape: AttentionShape) -> torch.Tensor:
    """The fused tensor of Q, K and V rows (the inverse of :func:`split_qkv`)."""
    g, per_group, d = shape.num_groups, shape.num_heads // shape.num_groups, shape.head_dim
    q, k, v = parts
    rest = q.shape[1:]
    grouped = [q.view(g, per_group, d, *rest), k.view(g, 1, d, *rest), v.view(g, 1, d, *rest)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)
