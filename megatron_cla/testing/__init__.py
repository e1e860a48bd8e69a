"""Run Megatron-Core (and your own distributed unit tests) on a laptop: CPU tensors, gloo.

Typical use in a ``conftest.py``::

    from megatron_cla.testing import enable_megatron_on_cpu, init_process_group_once
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()

and in a test::

    init_process_group_once()
    with model_parallel(tensor_model_parallel_size=1):
        model = GPTModel(...)

or, for several ranks, ``run_on_ranks(my_module.worker, 2, arg)``. The same tests run unchanged on
CUDA with NCCL, where :func:`enable_megatron_on_cpu` is not called.
"""

from megatron_cla.runtime.cpu import enable_megatron_on_cpu, is_megatron_on_cpu_enabled
from megatron_cla.testing.distributed import (
    RankFailure,
    backend,
    device,
    init_process_group_once,
    model_parallel,
    run_on_ranks,
)

__all__ = [
    "RankFailure",
    "backend",
    "device",
    "enable_megatron_on_cpu",
    "init_process_group_once",
    "is_megatron_on_cpu_enabled",
    "model_parallel",
    "run_on_ranks",
]
