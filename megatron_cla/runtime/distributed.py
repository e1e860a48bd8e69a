"""Start the process group of a launcher process (training, generation, export, conversion)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

__all__ = ["init_distributed"]


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
