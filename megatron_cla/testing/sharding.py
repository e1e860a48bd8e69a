"""Compare a model across parallel layouts through its distributed-checkpoint keys.

Megatron describes every local parameter shard in ``sharded_state_dict()``: a global key, the
global shape and the shard's offset in it, independent of TP/PP/VPP/DP. These helpers use that
description to

* :func:`fill_from_global` -- give every layout *identical* weights (each rank copies its shard of a
  deterministic global tensor, e.g. one seeded by the key: :func:`seeded_global_tensor`);
* :func:`collect_shards` / :func:`assemble` -- gather parameters or gradients of all ranks back into
  global tensors, so a TP2xPP2 run can be compared with a single-rank run key by key.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

__all__ = ["seeded_global_tensor", "fill_from_global", "collect_shards", "assemble"]

GlobalFactory = Callable[[str, tuple[int, ...]], torch.Tensor]


def _sharded_tensors(sharded: Any) -> Iterator[Any]:
    """Every ShardedTensor of a (nested) sharded state dict; factories are expanded."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, dict):
        for value in sharded.values():
            yield from _sharded_tensors(value)
    elif isinstance(sharded, (list, tuple)):
        for value in sharded:
            yield from _sharded_tensors(value)
    elif isinstance(sharded, ShardedTensorFactory):
        yield from _sharded_tensors(sharded.build())
    elif isinstance(sharded, ShardedTensor):
        yield sharded


def _global_index(sh: Any) -> tuple:
    prepend = sh.prepend_axis_num
    index: list[Any] = list(sh.global_offset[:prepend])
    for axis, size in enumerate(sh.data.shape):
        start = sh.global_offset[prepend + axis]
        index.append(slice(start, start + size))
    return tuple(index)


def seeded_global_tensor(key: str, shape: tuple[int, ...], std: float = 0.02) -> torch.Tensor:
    """A deterministic tensor for ``key``: N(0, std) for weights, 1 + N(0, 0.1) for norm scales."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=g, dtype=torch.float32)
    name = key.rsplit(".", 1)[-1]
    if "norm" in key and name.endswith("weight"):
        return 1.0 + 0.1 * values
    return std * values


def _model_sharded_dict(model: torch.nn.Module) -> Any:
    inner = getattr(model, "module", model)  # unwrap Megatron DDP
    return inner.sharded_state_dict()


def fill_from_global(
    models: Iterable[torch.nn.Module], make_global: GlobalFactory = seeded_global_tensor
) -> int:
    """Overwrite every parameter shard with its slice of ``make_global(key, global_shape)``.

    Returns the number of shards filled.
    """
    filled = 0
    with torch.no_grad():
        for model in models:
            for sh in _sharded_tensors(_model_sharded_dict(model)):
                if sh.data is None or sh.flattened_range is not None:
                    continue
                full = make_global(sh.key, tuple(sh.global_shape))
                sh.data.copy_(full[_global_index(sh)].to(sh.data.dtype))
                filled += 1
    return filled


def collect_shards(
    models: Iterable[torch.nn.Module], gradients: bool = False
) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """This rank's shards as ``(key, global_shape, global_index, tensor)``, parameters or grads.

    With ``gradients=True`` the Megatron-DDP ``main_grad`` (or ``.grad``) of each parameter is
    reported in the parameter's place.
    """
    models = list(models)
    params = [p for m in models for p in m.parameters()]
    saved = [p.data.clone() for p in params]
    shards = []
    try:
        if gradients:
            with torch.no_grad():
                for p in params:
                    grad = getattr(p, "main_grad", None)
                    grad = p.grad if grad is None else grad
                    p.data.copy_(torch.zeros_like(p) if grad is None else grad)
        for model in models:
            for sh in _sharded_tensors(_model_sharded_dict(model)):
                if sh.data is None or sh.flattened_range is not None:
                    continue
                value = sh.data.detach().cpu().clone()
                shards.append((sh.key, tuple(sh.global_shape), _global_index(sh), value))
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.data.copy_(value)
    return shards


def assemble(
    shards_per_rank: Iterable[list[tuple[str, tuple, tuple, torch.Tensor]]],
    replica_atol: Optional[float] = 1e-6,
) -> dict[str, torch.Tensor]:
    """Global tensors from the shards of all ranks.

    Replicated shards (the same slice reported by several ranks) must agree within
    ``replica_atol`` (scaled by the tensor's magnitude), and every element of every global tensor
    must be covered; otherwise ``AssertionError``.
    """
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for shards in shards_per_rank:
        for key, shape, index, value in shards:
            if key not in full:
                full[key] = torch.zeros(shape, dtype=value.dtype)
                seen[key] = torch.zeros(shape, dtype=torch.bool)
            region, covered = full[key][index], seen[key][index]
            if covered.any() and replica_atol is not None:
                scale = max(1.0, value.abs().max().item())
                diff = (region[covered] - value.reshape(region.shape)[covered]).abs().max().item()
                assert diff <= replica_atol * scale, f"replicas of {key} differ by {diff:.3e}"
            full[key][index] = value.reshape(region.shape)
            seen[key][index] = True
    missing = [k for k, covered in seen.items() if not covered.all()]
    assert not missing, f"not fully covered by the shards: {missing}"
    return full
