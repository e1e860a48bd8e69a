"""Functions run on spawned ranks by tests/test_harness.py."""

import os
import time

import torch
import torch.distributed as dist


def all_reduce_rank() -> float:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return value.item()


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 blocks here until the parent kills it
    return os.getpid()


def hang() -> None:
    time.sleep(600)


_MANAGER = None


def start_helper_process() -> int:
    """Start a long-lived multiprocessing helper, as dist-checkpointing's writer does."""
    global _MANAGER
    import multiprocessing

    _MANAGER = multiprocessing.get_context("spawn").Manager()
    return _MANAGER._process.pid
