"""Cross-layer K/V sharing applied to a trained model's weights (pure functions on state dicts).

The tensors are a decoder's parameters named as a single-rank ``GPTModel`` names them (what
``megatron-cla`` runs give via :func:`megatron_cla.training.weights.load_parameters`; a
Megatron-Bridge user gets the same from the stock model Bridge loaded). Per layer ``i``
(0-based) a producer holds ``decoder.layers.i.self_attention.linear_qkv.{weight,bias}`` with its
rows grouped per K/V head as ``[q_1 .. q_{H/G}, k, v]`` (:mod:`megatron_cla.conversion.qkv_layout`),
a consumer ``linear_q.{weight,bias}``.

* :func:`pool_kv_heads` (``--query-groups G``): the K/V heads of each block of consecutive heads
  become their mean, as the GQA paper uptrains MHA checkpoints (the query heads of those blocks
  form the new group, so nothing else moves).
* :func:`share_kv` (``--cla-share-factor S`` / ``--cla-producer-layers``): each new group's
  producer gets, with ``kv_init="mean"``, the mean over the group's layers of their K and V
  projections (bias and ``k_layernorm`` too), the way SwiftKV and LCKV initialise shared K/V;
  with ``"first"`` it keeps its own. Layers that become consumers keep their query rows (and
  ``q_layernorm``) and drop K/V. Every other tensor is passed on as it is.

Means are taken in fp32 and stored in the tensors' dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_cla.conversion.qkv_layout import AttentionShape, join_qkv, split_qkv
from megatron_cla.sharing import KVSharing

__all__ = ["KV_INITS", "check_merges_groups", "pool_kv_heads", "share_kv"]

Tensors = dict[str, torch.Tensor]
KV_INITS = ("mean", "first")
"""How a new producer's K/V projection starts: the group's mean, or its own."""
_ATTENTION = "decoder.layers.{}.self_attention."


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def pool_kv_heads(
    params: Tensors, shape: AttentionShape, groups: int
) -> tuple[Tensors, AttentionShape]:
    """``params`` with every layer's K/V heads mean-pooled to ``groups`` heads, and the new shape.

    ``groups`` must divide the current number of K/V heads."""
    if groups < 1 or shape.num_groups % groups:
        raise ValueError(
            f"--query-groups {groups} must divide the model's {shape.num_groups} K/V heads "
            f"(each new head is the mean of a block of old ones)"
        )
    if groups == shape.num_groups:
        return dict(params), shape
    pooled_shape = dataclasses.replace(shape, num_groups=groups)
    block = shape.num_groups // groups

    def pool(heads: torch.Tensor) -> torch.Tensor:
        rest = heads.shape[1:]
        blocks = heads.float().view(groups, block, shape.head_dim, *rest).mean(1)
        return blocks.reshape(groups * shape.head_dim, *rest).to(heads.dtype)

    out = {}
    for name, tensor in params.items():
        if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
            q, k, v = split_qkv(tensor, shape)
            tensor = join_qkv([q, pool(k), pool(v)], pooled_shape)
        out[name] = tensor
    return out, pooled_shape


def check_merges_groups(target: KVSharing, source: KVSharing) -> None:
    """``ValueError`` unless every producer of ``target`` is a producer of ``source`` (so each new
    group is a union of old groups and has K/V to start from)."""
    if target.num_layers != source.num_layers:
        raise ValueError(
            f"the new sharing covers {target.num_layers} layers, the model has {source.num_layers}"
        )
    without_kv = [p for p in target.producer_layers if not source.is_producer(p)]
    if without_kv:
        raise ValueError(
            f"layers {without_kv} would produce K/V but have none in this model (groups "
            f"{source.describe()}); choose a sharing whose producers are producers now, i.e. "
            f"one that merges whole groups (new groups {target.describe()})"
        )


def _group_members(sharing: KVSharing) -> dict[int, list[int]]:
    """Producer -> every layer of its group (1-based)."""
    groups: dict[int, list[int]] = {}
    for layer in range(1, sharing.num_layers + 1):
        groups.setdefault(sharing.producer_of(layer), []).append(layer)
    return groups


def _to_consumer(out: Tensors, layer: int, shape: AttentionShape) -> None:
    """A producer's tensors become a consumer's: query rows kept, K/V and k-norm dropped. What
    else ``linear_qkv`` holds (Transformer Engine's fused input norm ``layer_norm_weight`` /
    ``layer_norm_bias``, its ``_extra_state``) moves to ``linear_q`` as it is."""
    prefix = _ATTENTION.format(layer - 1)
    for name in [n for n in out if n.startswith(f"{prefix}linear_qkv.")]:
        kind = name[len(f"{prefix}linear_qkv.") :]
        value = out.pop(name)
        out[f"{prefix}linear_q.{kind}"] = (
            split_qkv(value, shape)[0] if kind in ("weight", "bias") else value
        )
    for name in [n for n in out if n.startswith(f"{prefix}k_layernorm.")]:
        del out[name]


def _shared_producer(params: Tensors, out: Tensors, producer: int, with_kv: list[int], shape):
    """The new producer's K/V (and k-norm): the mean over ``with_kv``."""
    prefixes = [_ATTENTION.format(layer - 1) for layer in with_kv]
    own = _ATTENTION.format(producer - 1)
    for kind in ("weight", "bias"):
        name = f"linear_qkv.{kind}"
        if own + name not in params:
            continue
        parts = [split_qkv(params[prefix + name], shape) for prefix in prefixes]
        q = split_qkv(params[own + name], shape)[0]
        k, v = _mean([p[1] for p in parts]), _mean([p[2] for p in parts])
        out[own + name] = join_qkv([q, k, v], shape)
    for name in [n[len(own) :] for n in params if n.startswith(own + "k_layernorm.")]:
        out[own + name] = _mean([params[prefix + name] for prefix in prefixes])


def share_kv(
    params: Tensors,
    shape: AttentionShape,
    target: KVSharing,
    kv_init: str = "mean",
    source: Optional[KVSharing] = None,
) -> Tensors:
    """The weights of the model with sharing ``target``, from ``params`` of a model with sharing
    ``source`` (default: every layer a producer). ``target`` must merge whole groups of
    ``source``: its producers are producers of ``source``."""
    if kv_init not in KV_INITS:
        raise ValueError(f"--kv-init {kv_init!r}: use one of {list(KV_INITS)}")
    source = source or KVSharing.uniform(target.num_layers, 1)
    check_merges_groups(target, source)
    out = dict(params)
    for producer, members in _group_members(target).items():
        with_kv = [layer for layer in members if source.is_producer(layer)]
        if kv_init == "mean" and len(with_kv) > 1:
            _shared_producer(params, out, producer, with_kv, shape)
        for layer in with_kv[1:]:
            _to_consumer(out, layer, shape)
    return out
