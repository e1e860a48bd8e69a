"""Process groups for tests: one in-process rank, or N spawned ranks with a hard timeout.

* :func:`init_process_group_once` starts a one-rank world in the current process (gloo on CPU,
  NCCL on GPU) so ordinary pytest functions can build Megatron models.
* :func:`model_parallel` initialises Megatron's parallel state (and its RNG tracker) for a block
  of code and always tears it down.
* :func:`run_on_ranks` runs a picklable function on N freshly spawned ranks and returns their
  results. Rendezvous goes through a file store (no TCP port to collide with), every rank has a
  deadline, and all ranks are killed if one fails or the deadline passes, so a failing test never
  leaves processes behind.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = [
    "backend",
    "init_process_group_once",
    "model_parallel",
    "run_on_ranks",
    "RankFailure",
    "device",
]


def backend() -> str:
    """``nccl`` where CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """The device tests should put models and data on."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def _prepare_process(rank: int, local_rank: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        from megatron_cla.runtime.cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()


def init_process_group_once() -> None:
    """Start a one-rank world in this process if none exists yet."""
    if dist.is_initialized():
        return
    _prepare_process(0, 0)
    path = tempfile.mkstemp(prefix="megatron_cla_store_")[1]
    store = dist.FileStore(path, 1)
    dist.init_process_group(backend(), store=store, rank=0, world_size=1)


@contextlib.contextmanager
def model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    **kwargs: Any,
) -> Iterator[None]:
    """Megatron parallel state (and seeded RNG tracker) for the duration of the block."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.runtime.distributed import megatron_parallel_state

    with megatron_parallel_state(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        **kwargs,
    ):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        yield


class RankFailure(RuntimeError):
    """A spawned rank raised, crashed or timed out; the message holds its traceback."""


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store_path: str,
    args: tuple,
    results: mp.Queue,
) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        _prepare_process(rank, rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend(), store=store, rank=rank, world_size=world_size)
        value = fn(*args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return the per-rank results in order.

    ``fn`` must be importable by name (a module-level function) and its result picklable with
    ``torch.save``. Inside ``fn``, ``torch.distributed`` is initialised and the ``RANK`` /
    ``WORLD_SIZE`` environment variables are set.

    Raises:
        RankFailure: with the failing rank's traceback, if any rank raises, dies or times out.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="megatron_cla_ranks_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, store_path, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            values = _collect(procs, results, world_size, timeout)
        except BaseException:
            _kill_trees(procs)
            raise
        # Let ranks finish their own shutdown (process-group teardown, atexit handlers that stop
        # helpers such as dist-checkpointing's multiprocessing manager); kill only stragglers.
        deadline = time.monotonic() + 60
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        _kill_trees(procs)
        return values


def _kill_trees(procs: list) -> None:
    """SIGKILL every rank still alive together with all of its descendants."""
    import psutil

    victims = []
    for p in procs:
        if p.pid is None:
            continue
        try:
            rank = psutil.Process(p.pid)
            victims.extend(rank.children(recursive=True))
            victims.append(rank)
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    for p in procs:
        p.join(timeout=10)


def _collect(procs: list, results: mp.Queue, world_size: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RankFailure(
                f"ranks {sorted(set(range(world_size)) - set(values))} did not finish within "
                f"{timeout:.0f} s (deadlock or too slow); all ranks were killed."
            )
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except Exception:  # queue.Empty: check for ranks that died without reporting
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead and all(i not in values for i in dead):
                raise RankFailure(
                    f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}"
                ) from None
            continue
        if not ok:
            raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
        values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [values[r] for r in range(world_size)]
