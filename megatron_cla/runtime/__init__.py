"""How a megatron_cla process starts: its process group and, without a GPU, Megatron on the CPU.

* :func:`~megatron_cla.runtime.distributed.init_distributed`: NCCL on GPUs, gloo on CPUs; the
  ``env://`` rendezvous under ``torchrun``/``srun``, a one-rank world otherwise.
* :func:`~megatron_cla.runtime.distributed.megatron_parallel_state`: Megatron's parallel state
  for a block of code, its process groups destroyed afterwards.
* :func:`~megatron_cla.runtime.cpu.enable_megatron_on_cpu`: the patches that let unmodified
  Megatron-Core code run on CPU tensors (laptops, CI, the CPU test suite).
"""

from megatron_cla.runtime.cpu import enable_megatron_on_cpu, is_megatron_on_cpu_enabled
from megatron_cla.runtime.distributed import init_distributed, megatron_parallel_state

__all__ = [
    "enable_megatron_on_cpu",
    "init_distributed",
    "is_megatron_on_cpu_enabled",
    "megatron_parallel_state",
]
