"""Run Megatron-Core on a machine without a GPU (CPU tensors, gloo collectives).

Megatron-Core has no CPU mode: it allocates on ``torch.cuda.current_device()``, hard-codes
``device="cuda"`` in schedules, the optimizer and checkpointing, and keeps its model-parallel RNG
streams in CUDA generators. :func:`enable_megatron_on_cpu` patches exactly those assumptions, in
this process only, so that unmodified Megatron-Core code paths (local spec, pipeline schedules,
DDP, optimizer, ``dist_checkpointing``) run on CPU tensors:

* a :class:`torch.overrides.TorchFunctionMode` that rewrites any CUDA ``device=`` argument,
  ``Tensor.to("cuda")`` and ``Tensor.cuda()`` to the CPU, drops ``pin_memory`` requests, and
  reports CUDA type names from ``Tensor.type()`` (Megatron's optimizer asserts them);
* ``torch.cuda.current_device``/``device_count``/``synchronize``/streams/events become harmless;
* Megatron's inference stack runs on the CPU: the text-generation controller gets a CPU sampling
  generator, NVTX ranges are no-ops, the paged cache is appended to without Triton, and dynamic
  batching's flash-attn version assertion is skipped (megatron_cla's attention computes paged
  attention itself on CPU tensors, see :class:`megatron_cla.paged_attention.PagedAttentionOnCPU`;
  stock attention still needs flash-attn);
* the "CUDA" RNG API that Megatron's ``CudaRNGStatesTracker`` uses is routed to the CPU default
  generator, which is the generator CPU dropout actually draws from. The tracker's fork therefore
  switches real random streams (tensor-parallel dropout differs across TP ranks, recompute replays
  the same mask), and its "CPU RNG state changed within GPU RNG context" warning, which is
  meaningless here, is filtered out.

The patches are process-wide and idempotent. The launcher applies them when it finds no GPU
(:func:`megatron_cla.runtime.distributed.init_distributed`), and so does the CPU test harness
(:mod:`megatron_cla.testing`); never apply them in a process that also drives a real GPU. The mode
must be active wherever Megatron code runs; ``enable_megatron_on_cpu`` enters it for the calling
thread and re-enters it inside autograd's backward so that recomputation code in backward is
covered too.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_megatron_on_cpu", "is_megatron_on_cpu_enabled"]

_STATE: dict[str, Any] = {"enabled": False, "mode": None}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every request for a CUDA device into a request for the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.pin_memory):
            return args[0]
        if kwargs.get("pin_memory"):  # pinned host memory needs a CUDA allocator
            kwargs["pin_memory"] = False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts e.g. `param.grad.type() == 'torch.cuda.FloatTensor'`.
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(torch.device("cpu") if _is_cuda_device(a) else a for a in args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: work is synchronous on the CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_rng_get(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = _cpu_rng_set
    cuda.manual_seed = _cpu_manual_seed
    # Routing manual_seed_all to torch.manual_seed would recurse (torch.manual_seed calls it).
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = _cpu_rng_get
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.memory_stats = lambda *a, **k: collections.defaultdict(int)
    # NVTX profiler ranges exist only in CUDA builds.
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.mark = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_get
    mrandom._set_cuda_rng_state = _cpu_rng_set
    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())


_REAL_GENERATOR = torch.Generator


def _cpu_generator(device: Any = "cpu") -> torch.Generator:
    """``torch.Generator(device=<cuda>)`` made on the CPU instead."""
    return _REAL_GENERATOR("cpu" if _is_cuda_device(device) else device)


def _patch_megatron_inference() -> None:
    """Megatron's text-generation controller makes its sampling RNG on the current CUDA device."""
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.engines import dynamic_engine
    from megatron.core.inference.text_generation_controllers import text_generation_controller

    for name in ("range_push", "range_pop"):  # bound at import, maybe before our NVTX patch
        if hasattr(dynamic_engine, name):
            setattr(dynamic_engine, name, getattr(torch.cuda.nvtx, name))

    controller = text_generation_controller.TextGenerationController
    original_init = controller.__init__

    @functools.wraps(original_init)
    def init_with_cpu_generator(self: Any, *args: Any, **kwargs: Any) -> None:
        torch.Generator = _cpu_generator
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.Generator = _REAL_GENERATOR

    controller.__init__ = init_with_cpu_generator
    # Triton kernels need a GPU; Megatron's PyTorch path appends to the paged cache instead.
    dynamic_context.triton_append_key_value_cache = None

    # Dynamic batching asserts a flash-attn version before attending. Flash-attn cannot run on a
    # CPU; megatron_cla's attention serves the paged cache itself there (PagedAttentionOnCPU).
    from megatron.core.transformer import attention

    attention.is_fa_min_version = lambda *a, **k: True


def _reenter_mode_in_backward() -> None:
    """Autograd runs backward outside the caller's function-mode stack: wrap its entry points."""
    original_run_backward = torch.autograd.graph._engine_run_backward

    @functools.wraps(original_run_backward)
    def run_backward(*args: Any, **kwargs: Any) -> Any:
        with _enter_mode_if_inactive():
            return original_run_backward(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = run_backward
    torch.autograd._engine_run_backward = run_backward  # type: ignore[attr-defined]


@contextlib.contextmanager
def _enter_mode_if_inactive():
    from torch.overrides import _get_current_function_mode_stack

    if any(isinstance(m, _CudaToCpuMode) for m in _get_current_function_mode_stack()):
        yield
        return
    with _CudaToCpuMode():
        yield


def is_megatron_on_cpu_enabled() -> bool:
    """Whether :func:`enable_megatron_on_cpu` has run in this process."""
    return bool(_STATE["enabled"])


def enable_megatron_on_cpu() -> None:
    """Patch this process so that Megatron-Core runs on CPU tensors (idempotent).

    Raises:
        RuntimeError: if CUDA is available: the patches would silently move a GPU job to the CPU.
    """
    if _STATE["enabled"]:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "enable_megatron_on_cpu() refuses to run where CUDA is available: it would move "
            "Megatron's GPU work to the CPU. Run GPU tests without it."
        )
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_inference()
    _reenter_mode_in_backward()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)
