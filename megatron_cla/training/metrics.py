"""What a run reports: log lines, ``metrics.jsonl``, TensorBoard scalars, a progress bar.

Only global rank 0 writes. Every ``log_interval`` steps a line like::

    step 100/300 | loss 4.8123 | lr 1.80e-03 | grad norm 0.912 | 3,412 tok/s | mem 0.61 GB |
    KV cache 8,192 B/token (no CLA: 16,384)

A distillation run adds the parts of its loss after it: ``| ce 4.9012 | kl 0.2310 | teacher ce
4.7011``. Evaluations add ``val loss`` and ``val ppl``; the run ends with a summary line and
``summary.json`` (steps, tokens, final validation ppl, parameters, KV bytes/token, tokens/s).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["RunReporter", "peak_memory_gb"]


def peak_memory_gb() -> float:
    """Peak GPU memory allocated (GPU) or peak resident set size of the process (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class RunReporter:
    """Rank-0 reporting of a training run (a no-op object on other ranks)."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        tokens_per_step: int,
        kv_bytes: tuple[int, int],
        tensorboard: bool,
        progress_bar: bool,
        log_interval: int,
    ) -> None:
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self.total, self.tokens_per_step, self.log_interval = (
            total_steps,
            tokens_per_step,
            (log_interval),
        )
        self.kv_bytes = kv_bytes
        self.window: list[float] = []
        self.part_windows: dict[str, list[float]] = {}
        self.window_start = time.perf_counter()
        self.started = time.perf_counter()
        self.steps_run = 0
        self.writer = self.bar = self.metrics = None
        if not self.active:
            return
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.print("TensorBoard scalars off: `pip install tensorboard` to get them")
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)

    def print(self, message: str) -> None:
        """A line on stdout (rank 0), kept clear of the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def _record(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", " "), value, row["step"])

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: Optional[float],
        updated: bool = True,
        parts: Optional[dict[str, float]] = None,
    ) -> None:
        """Record one optimizer step; print a line every ``log_interval`` steps, and for every
        step skipped because its loss or gradients were not finite. ``parts``: what the loss is
        made of (distillation: ``ce``, ``kl``, ``teacher_ce``), logged beside it."""
        self.steps_run += 1
        parts = parts or {}
        if updated:
            self.window.append(loss)
            for key, value in parts.items():
                self.part_windows.setdefault(key, []).append(value)
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        row = {"step": step, "loss": loss, **parts, "lr": lr, "grad_norm": grad_norm}
        self._record(row if updated else {**row, "skipped": True})
        if not updated:
            self.print(
                f"step {step}/{self.total} | loss {loss:.4f} | skipped: non-finite loss or "
                f"gradient, no update"
            )
            return
        if step % self.log_interval and step != self.total:
            return
        elapsed = time.perf_counter() - self.window_start
        tokens_per_s = len(self.window) * self.tokens_per_step / max(elapsed, 1e-9)
        with_cla, without = self.kv_bytes
        norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        means = "".join(
            f" | {key.replace('_', ' ')} {sum(values) / len(values):.4f}"
            for key, values in self.part_windows.items()
        )
        self.print(
            f"step {step}/{self.total} | loss {sum(self.window) / len(self.window):.4f}{means} | "
            f"lr {lr:.2e} | grad norm {norm} | {tokens_per_s:,.0f} tok/s | "
            f"mem {peak_memory_gb():.2f} GB | KV cache {with_cla:,} B/token (no CLA: {without:,})"
        )
        self._record({"step": step, "tokens_per_s": tokens_per_s, "memory_gb": peak_memory_gb()})
        self.window, self.part_windows, self.window_start = [], {}, time.perf_counter()

    def evaluation(self, step: int, val_loss: float) -> float:
        """Record a validation loss; returns (and prints) the perplexity."""
        ppl = math.exp(min(val_loss, 50.0))
        if self.active:
            self.print(f"step {step} | validation loss {val_loss:.4f} | validation ppl {ppl:.2f}")
            self._record({"step": step, "val_loss": val_loss, "val_ppl": ppl})
        return ppl

    def summary(self, name: str, step: int, val_ppl: Optional[float], params: int) -> None:
        """The closing lines of a run."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.started
        tokens = self.steps_run * self.tokens_per_step
        with_cla, without = self.kv_bytes
        self.print(
            f"done: {name} | {step} steps ({self.steps_run} this run, {tokens:,} tokens in "
            f"{elapsed:.0f} s, {tokens / max(elapsed, 1e-9):,.0f} tok/s) | parameters "
            f"{params:,} | final validation ppl "
            f"{'n/a' if val_ppl is None else f'{val_ppl:.2f}'} | KV cache {with_cla:,} "
            f"B/token vs {without:,} without CLA ({with_cla / without:.2f}x) | peak memory "
            f"{peak_memory_gb():.2f} GB"
        )
        summary = {
            "name": name,
            "steps": step,
            "tokens": step * self.tokens_per_step,
            "val_ppl": val_ppl,
            "params": params,
            "kv_bytes_per_token": with_cla,
            "kv_bytes_per_token_without_cla": without,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "seconds": elapsed,
            "peak_memory_gb": peak_memory_gb(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.writer is not None:
            self.writer.close()
        self.metrics.close()
