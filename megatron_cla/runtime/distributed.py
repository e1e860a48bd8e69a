"""The process group of a launcher process (training, generation, export, conversion) and
Megatron's parallel state inside it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "live_process_groups", "megatron_parallel_state"]


def init_distributed(on_gpu: bool) -> bool:
    """Start the process group unless the caller already did; True if started here.

    On a GPU: NCCL, one device per local rank. Without one: gloo, with Megatron-Core patched to
    run on the CPU (:func:`~megatron_cla.runtime.cpu.enable_megatron_on_cpu`). Under
    ``torchrun``/``srun`` the ``env://`` rendezvous variables are used, otherwise a one-rank world.
    """
    if dist.is_initialized():
        return False
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    else:
        from megatron_cla.runtime.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    backend = "nccl" if on_gpu else "gloo"
    if "RANK" in os.environ:  # torchrun / srun with the env:// rendezvous variables
        dist.init_process_group(backend)
    else:
        store = dist.FileStore(tempfile.mkstemp(prefix="megatron_cla_")[1], 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return True


@contextlib.contextmanager
def megatron_parallel_state(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, **kwargs: Any
) -> Iterator[None]:
    """Megatron's parallel state (``initialize_model_parallel`` with these arguments) for the
    duration of a block, torn down on the way out, error or not.

    Megatron's ``destroy_model_parallel`` only forgets its groups; the groups stay registered
    with ``torch.distributed`` and every gloo group keeps its threads running. A process that
    sets the state up repeatedly (a notebook, a test session, a tool that imports, converts and
    exports in one go) would pile up thousands of threads and crawl, so the groups this block
    created are destroyed here as well. The default (world) group is left as it was.
    """
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    before = set(live_process_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        for group in set(live_process_groups()) - before:
            dist.destroy_process_group(group)


def live_process_groups() -> list:
    """Every live process group of this process except the default one."""
    if not dist.is_initialized():
        return []
    world = dist.distributed_c10d._world
    return [g for g in world.pg_map if g is not dist.GroupMember.WORLD]
