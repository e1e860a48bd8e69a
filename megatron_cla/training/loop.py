"""The training loop: Megatron's pipeline schedules, optimizer step, evaluation, checkpoints."""

from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_cla.training.batches import BatchStream, forward_step
from megatron_cla.training.checkpoint import Checkpointer, TrainState
from megatron_cla.training.metrics import RunReporter
from megatron_cla.training.plan import RunPlan

__all__ = ["DivergedRun", "Run", "train"]


@dataclass
class Run:
    """The live objects of a run."""

    plan: RunPlan
    chunks: list
    optimizer: Any
    scheduler: Any
    train_stream: BatchStream
    eval_batches: list
    checkpointer: Optional[Checkpointer]
    reporter: RunReporter
    state: TrainState
    train_forward_step: Callable = forward_step
    """The schedule callback of training steps (distillation runs: the teacher's too);
    evaluation always measures the student's own cross-entropy with ``forward_step``."""


def _schedule(run: Run, batches: list, forward_only: bool, step_func: Callable) -> list[dict]:
    chunks = run.chunks
    iterators = [iter(batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=run.plan.config.model.seq_length,
        micro_batch_size=run.plan.config.train.micro_batch_size,
        forward_only=forward_only,
    )


def _mean_loss(reports: list[dict]) -> float:
    """Token-weighted mean loss over microbatches and data-parallel ranks, known on every rank."""
    return _token_means(reports, [])[0]


def _token_means(reports: list[dict], extra: list[str]) -> list[float]:
    """Token-weighted means, over microbatches and data-parallel ranks, of the loss and of the
    sums a report keeps under ``distillation_sums`` (named ``extra``); known on every rank."""
    totals = torch.zeros(2 + len(extra), dtype=torch.float64, device=_device())
    for report in reports:
        totals[:2] += report["loss_sum_and_tokens"].to(totals)
        if extra:
            totals[2:] += report["distillation_sums"].to(totals)
    # Only the last pipeline stage computed losses: sum over DP ranks and over PP stages.
    dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    means = totals / totals[1].clamp(min=1)
    return [means[0].item(), *means[2:].tolist()]


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def evaluate(run: Run) -> float:
    """Mean validation loss over the fixed held-out batches."""
    for chunk in run.chunks:
        chunk.eval()
    reports: list[dict] = []
    with torch.no_grad():
        for batches in run.eval_batches:
            reports.extend(_schedule(run, batches, True, forward_step))
    for chunk in run.chunks:
        chunk.train()
    return _mean_loss(reports)


class DivergedRun(ValueError):
    """Too many steps in a row had a non-finite loss or gradient (``train.max_skipped_steps``),
    or the weights themselves are no longer finite."""


def _all_finite(tensors: Any) -> bool:
    """Whether every tensor on every rank is finite (collective: all ranks get the same
    answer, so all of them skip, stop or save together)."""
    flag = torch.ones(1, device=_device())
    for tensor in tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            flag.zero_()
            break
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gradients(run: Run) -> Any:
    for chunk in run.chunks:
        for param in chunk.parameters():
            yield getattr(param, "main_grad", param.grad)


DISTILLATION_PARTS = ["ce", "kl", "teacher_ce"]
"""What a distillation step reports besides its loss: the student's cross-entropy, the KL to
the teacher and the teacher's cross-entropy (token means)."""


def _train_step(run: Run) -> tuple[float, dict[str, float], Optional[float], bool]:
    """One step: (mean loss, distillation parts, gradient norm, whether the update was applied).
    A step whose loss or gradients are not finite changes no weight and no optimizer state."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    batches = run.train_stream.step(run.plan.num_microbatches)
    reports = _schedule(run, batches, False, run.train_forward_step)
    extra = DISTILLATION_PARTS if run.plan.config.uptrain.teacher is not None else []
    loss, *values = _token_means(reports, extra)
    parts = dict(zip(extra, values, strict=True))
    run.state.iteration += 1
    run.state.consumed_samples = run.train_stream.consumed_samples
    # fp16: Megatron's loss scaler skips a step whose scaled gradients overflow and lowers the
    # scale (the first steps do that by design); it is not a failure of the run.
    scaled = run.plan.dtype == torch.float16
    if not math.isfinite(loss) or not (scaled or _all_finite(_gradients(run))):
        return loss, parts, None, False
    updated, grad_norm, _ = run.optimizer.step()
    if updated:
        run.scheduler.step(increment=run.plan.config.train.global_batch_size)
    return loss, parts, (None if grad_norm is None else float(grad_norm)), True


def _due(step: int, interval: int, last: int) -> bool:
    return step == last or (interval > 0 and step % interval == 0)


class _StopRequest:
    """SIGTERM/SIGINT (e.g. SLURM preemption) -> checkpoint at the next step boundary, exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _last_good(run: Run) -> str:
    """Where the run can resume from, for an error message."""
    complete = [] if run.checkpointer is None else run.checkpointer.complete_iterations()
    if not complete:
        return "no checkpoint was written"
    return f"the newest checkpoint, {run.checkpointer.path(complete[-1])}, has finite weights"


def _save(run: Run, step: int, config_dict: dict) -> None:
    """Save a checkpoint, but never one with non-finite weights (retention would then delete
    a good one): stop the run instead."""
    if not _all_finite(p for chunk in run.chunks for p in chunk.parameters()):
        raise DivergedRun(
            f"step {step}: the weights are not finite, so no checkpoint was written; "
            f"{_last_good(run)}; lower train.lr"
        )
    path = run.checkpointer.save(run.state, run.chunks, run.optimizer, run.scheduler, config_dict)
    run.reporter.print(f"step {step} | saved checkpoint {path}")


def train(run: Run) -> Optional[float]:
    """Train to ``train.train_iters``; returns the final validation perplexity."""
    cfg = run.plan.config
    last, val_ppl, stop = cfg.train.train_iters, None, _StopRequest()
    config_dict = asdict(cfg)
    skipped = 0
    if cfg.logging.eval_at_start and run.state.iteration < last:
        val_ppl = run.reporter.evaluation(run.state.iteration, evaluate(run))
    while run.state.iteration < last:
        loss, parts, grad_norm, updated = _train_step(run)
        step = run.state.iteration
        skipped = 0 if updated else skipped + 1
        lr = run.optimizer.param_groups[0]["lr"]
        run.reporter.step(step, loss, lr, grad_norm, updated, parts)
        if skipped > cfg.train.max_skipped_steps:
            raise DivergedRun(
                f"step {step}: {skipped} steps in a row had a non-finite loss or gradient "
                f"(train.max_skipped_steps={cfg.train.max_skipped_steps}); "
                f"{_last_good(run)}; lower train.lr or raise train.warmup_iters"
            )
        if _due(step, cfg.logging.eval_interval, last):
            val_ppl = run.reporter.evaluation(step, evaluate(run))
        stopping = stop.agreed()
        if run.checkpointer is not None and (
            _due(step, cfg.checkpoint.save_interval, last) or stopping
        ):
            _save(run, step, config_dict)
        if stopping:
            run.reporter.print(f"step {step} | stop requested: checkpoint saved, exiting")
            break
    return val_ppl
