"""The CLA conversion one K/V group at a time, for models too large to convert at once.

:func:`converted_stage_tensors` gives the converted tensors of the layers a pipeline stage holds,
reading the source's tensors through a callback one group of layers at a time (from a Hugging
Face file, or from a loaded model): at no point does it hold more of the source than one group.
Each group is converted by :func:`~megatron_cla.conversion.cla_weights.share_kv` (after
:func:`~megatron_cla.conversion.cla_weights.pool_kv_heads` for ``--query-groups``) on that
group's layers renumbered from 1, so the numbers are exactly those of the whole-model
conversion; tensors outside the layers are passed on as read.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron_cla.conversion.cla_weights import pool_kv_heads, share_kv
from megatron_cla.conversion.qkv_layout import AttentionShape
from megatron_cla.sharing import KVSharing

__all__ = ["converted_stage_tensors"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _layer_of(name: str) -> Optional[int]:
    """1-based layer of a GPT-named tensor, None outside the decoder layers."""
    match = _LAYER.match(name)
    return None if match is None else int(match.group(1)) + 1


def _renumbered(name: str, number: dict[int, int]) -> str:
    match = _LAYER.match(name)
    return f"decoder.layers.{number[int(match.group(1)) + 1] - 1}.{match.group(2)}"


def _groups(target: KVSharing, layers: set[int]) -> list[list[int]]:
    """The target's K/V groups among ``layers`` (1-based), each wholly inside them."""
    groups: dict[int, list[int]] = {}
    for layer in sorted(layers):
        groups.setdefault(target.producer_of(layer), []).append(layer)
    for producer, members in groups.items():
        if producer not in layers:
            raise ValueError(
                f"layers {members} share the K/V of layer {producer}, which another pipeline "
                f"stage holds; convert with a rank count whose stages start on producers"
            )
    return list(groups.values())


def converted_stage_tensors(
    source_names: list[str],
    read: Callable[[str], torch.Tensor],
    shape: AttentionShape,
    source: KVSharing,
    target: KVSharing,
    kv_init: str,
    query_groups: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """The converted tensors of the stage whose source tensors are ``source_names`` (GPT-named,
    global layer numbers), each read once by ``read(name)``."""
    out = {name: read(name) for name in source_names if _layer_of(name) is None}
    by_layer: dict[int, list[str]] = {}
    for name in source_names:
        if (layer := _layer_of(name)) is not None:
            by_layer.setdefault(layer, []).append(name)
    for members in _groups(target, set(by_layer)):
        local = {layer: i + 1 for i, layer in enumerate(members)}
        back = {i: layer for layer, i in local.items()}
        group = {_renumbered(n, local): read(n) for m in members for n in by_layer[m]}
        group_shape = shape
        if query_groups is not None:
            group, group_shape = pool_kv_heads(group, shape, query_groups)
        produced = [local[m] for m in members if source.is_producer(m)]
        converted = share_kv(
            group,
            group_shape,
            KVSharing.from_producer_layers(len(members), [1]),
            kv_init,
            KVSharing.from_producer_layers(len(members), produced),
        )
        out.update({_renumbered(n, back): t for n, t in converted.items()})
    return out
