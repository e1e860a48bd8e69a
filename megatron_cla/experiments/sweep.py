"""Train a grid of CLA variants (``megatron-cla sweep --grid configs/sweeps/X.yaml``).

A grid file names a base config, overrides common to every run, the seeds, and the variants
(each a list of overrides); optionally an LR sweep over some variants. Every run trains with the
same data (``data.dir``, ``data.seed``: identical data order) and the same token budget (the grid
is rejected otherwise), one ``megatron-cla pretrain`` process per run, one after the
other. Finished runs (``summary.json`` at the final step) are skipped and interrupted ones resume
from their checkpoints, so the command can be re-run until the grid is done. After every run the
results table is rewritten: ``results.csv`` and ``results.json`` in the output directory
(variant, lr, seed, KV bytes/token, params, tokens, validation ppl, tokens/s, seconds).

Grid file::

    name: cpu_small
    base: configs/tiny_mqa.yaml            # relative to the working directory
    common: [train.train_iters=150, data.dir=runs/data/default]
    seeds: [1, 2, 3]
    variants:
      H64-MQA: [model.num_attention_heads=4]
      H64-MQA-CLA2: [model.num_attention_heads=4, model.cla_share_factor=2]
    lr_sweep:                               # optional: more learning rates for some variants
      variants: [H64-MQA, H64-MQA-CLA2]
      lrs: [1.0e-3, 4.0e-3]
      seeds: [1, 2]                         # optional subset of `seeds` (default: all)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_cla.training.config import PretrainConfig, load_config

__all__ = ["Grid", "SweepRun", "load_grid", "plan_runs", "run_sweep", "write_results"]

RESULT_FIELDS = [
    "variant",
    "lr",
    "main",
    "seed",
    "kv_bytes_per_token",
    "params",
    "tokens",
    "val_ppl",
    "tokens_per_s",
    "seconds",
]


@dataclasses.dataclass
class Grid:
    """A sweep definition (see the module docstring)."""

    name: str
    """Name of the sweep (shown in logs and reports)."""
    base: str
    """Base pretraining config (YAML path)."""
    common: list[str]
    """Overrides applied to every run (token budget, data, logging)."""
    seeds: list[int]
    """``train.seed`` of the repeats of every variant (weight initialisation)."""
    variants: dict[str, list[str]]
    """Variant name -> its overrides."""
    lr_sweep_variants: list[str] = dataclasses.field(default_factory=list)
    """Variants that are also trained at ``lr_sweep_lrs``."""
    lr_sweep_lrs: list[float] = dataclasses.field(default_factory=list)
    """Extra peak learning rates (``train.min_lr`` follows at a tenth)."""
    lr_sweep_seeds: list[int] = dataclasses.field(default_factory=list)
    """Seeds of the LR-sweep runs (a subset of ``seeds``; empty = all of them)."""
    claims: list[dict[str, str]] = dataclasses.field(default_factory=list)
    """Orderings to check in the report: ``{better: A, worse: B, paper: "..."}``."""


@dataclasses.dataclass
class SweepRun:
    """One training run of the grid."""

    variant: str
    lr: float
    seed: int
    config: PretrainConfig
    overrides: list[str]
    main: bool = True
    """At the variant's base learning rate (False: an LR-sweep run)."""

    def directory(self, out: Path) -> Path:
        """Where the run writes (checkpoints, metrics, summary)."""
        return run_directory(out, self.variant, self.lr, self.seed)


def run_directory(out: Path, variant: str, lr: float, seed: int) -> Path:
    """Directory of one run under the sweep's output directory."""
    return out / "runs" / variant / f"lr{lr:g}" / f"seed{seed}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def load_grid(path: Path) -> Grid:
    """Read and check a grid file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = {"name", "base", "common", "seeds", "variants", "lr_sweep", "claims"}
    _require(
        not set(raw) - known,
        f"{path}: unknown key(s) {sorted(set(raw) - known)}; valid: {sorted(known)}",
    )
    for key in ("name", "base", "seeds", "variants"):
        _require(key in raw, f"{path}: missing key {key!r}")
    sweep = raw.get("lr_sweep") or {}
    grid = Grid(
        name=str(raw["name"]),
        base=str(raw["base"]),
        common=[str(o) for o in raw.get("common") or []],
        seeds=[int(s) for s in raw["seeds"]],
        variants={str(k): [str(o) for o in v or []] for k, v in raw["variants"].items()},
        lr_sweep_variants=[str(v) for v in sweep.get("variants", [])],
        lr_sweep_lrs=[float(lr) for lr in sweep.get("lrs", [])],
        lr_sweep_seeds=[int(s) for s in sweep.get("seeds", [])],
        claims=[{str(k): str(v) for k, v in c.items()} for c in raw.get("claims") or []],
    )
    named = {c.get(k) for c in grid.claims for k in ("better", "worse")}
    _require(
        all({"better", "worse"} <= set(c) for c in grid.claims) and named <= set(grid.variants),
        f"{path}: every claim needs `better` and `worse` naming variants of the grid",
    )
    unknown = sorted(set(grid.lr_sweep_variants) - set(grid.variants))
    _require(not unknown, f"{path}: lr_sweep names unknown variant(s) {unknown}")
    _require(len(set(grid.seeds)) == len(grid.seeds) >= 1, f"{path}: seeds must be distinct")
    extra = sorted(set(grid.lr_sweep_seeds) - set(grid.seeds))
    _require(not extra, f"{path}: lr_sweep seeds {extra} are not in seeds {grid.seeds}")
    return grid


def _forbidden(overrides: list[str], where: str) -> None:
    """Variants may not change what must be identical across the grid."""
    shared = (
        "data.",
        "train.train_iters",
        "train.global_batch_size",
        "model.seq_length",
        "train.seed",
        "train.lr=",
        "logging.run_dir",
    )
    bad = [o for o in overrides if o.startswith(shared)]
    _require(
        not bad,
        f"{where} sets {bad}: data, token budget, seed, lr and run_dir are set "
        f"by the sweep (put shared settings in `common`)",
    )


def _make_run(
    grid: Grid, variant: str, overrides: list[str], lr: float, seed: int, out: Path, main: bool
) -> SweepRun:
    directory = run_directory(out, variant, lr, seed)
    run_overrides = [
        *grid.common,
        *overrides,
        f"train.seed={seed}",
        f"train.lr={lr}",
        f"train.min_lr={lr / 10}",
        "logging.progress_bar=false",
        f"logging.run_dir={directory}",
    ]
    config = load_config(Path(grid.base), run_overrides)
    return SweepRun(variant, lr, seed, config, run_overrides, main)


def plan_runs(grid: Grid, out: Path) -> list[SweepRun]:
    """Every run of the grid, validated (identical data order and token budget)."""
    runs = []
    for variant, overrides in grid.variants.items():
        _forbidden(overrides, f"variant {variant}")
        base_cfg = load_config(Path(grid.base), [*grid.common, *overrides])
        lrs = [base_cfg.train.lr]
        if variant in grid.lr_sweep_variants:
            lrs += [lr for lr in grid.lr_sweep_lrs if lr != base_cfg.train.lr]
        for lr in lrs:
            main = lr == lrs[0]
            for seed in grid.seeds if main else (grid.lr_sweep_seeds or grid.seeds):
                runs.append(_make_run(grid, variant, overrides, lr, seed, out, main))
    _same_budget_and_data(runs)
    return runs


def _same_budget_and_data(runs: list[SweepRun]) -> None:
    def key(run: SweepRun) -> tuple:
        c = run.config
        tokens = c.train.train_iters * c.train.global_batch_size * c.model.seq_length
        return tokens, c.data.dir, c.data.seed, tuple(c.data.inputs), c.data.vocab_size

    keys = {key(r) for r in runs}
    _require(
        len(keys) == 1,
        f"runs differ in token budget or data (tokens, dir, seed, "
        f"inputs, vocab): {sorted(keys, key=str)}; set them in `common` only",
    )


def _finished(run: SweepRun, out: Path) -> Optional[dict[str, Any]]:
    path = run.directory(out) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["steps"] == run.config.train.train_iters else None


def _start(run: SweepRun, base: str, out: Path) -> subprocess.Popen:
    directory = run.directory(out)
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_cla", "pretrain", "--config", base, *run.overrides]
    with open(directory / "train.log", "a", encoding="utf-8") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _collect(run: SweepRun, out: Path, returncode: int) -> dict[str, Any]:
    summary = _finished(run, out)
    if returncode != 0 or summary is None:
        raise RuntimeError(
            f"run {run.directory(out)} failed (exit {returncode}); see its train.log"
        )
    return summary


def _next_done(active: dict[int, subprocess.Popen]) -> tuple[int, int]:
    """Wait for any active run to exit; its index and exit status."""
    while True:
        for index, proc in active.items():
            if proc.poll() is not None:
                return index, proc.returncode
        time.sleep(0.5)


def _row(run: SweepRun, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "variant": run.variant,
        "lr": run.lr,
        "main": run.main,
        "seed": run.seed,
        **{k: summary[k] for k in RESULT_FIELDS[4:]},
    }


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """``results.csv`` and ``results.json`` of the runs finished so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def run_sweep(grid: Grid, out: Path, parallel: int = 1) -> list[dict[str, Any]]:
    """Train every unfinished run of ``grid``, ``parallel`` at a time; returns the result rows.

    Several runs at a time help on a GPU that one small model cannot fill; their tokens/s are
    then shares of the GPU (the report says how many ran at a time).
    """
    runs = plan_runs(grid, out)
    summaries = {i: _finished(run, out) for i, run in enumerate(runs)}
    pending = [i for i, summary in summaries.items() if summary is None]
    active: dict[int, subprocess.Popen] = {}
    started = time.perf_counter()
    reported = 0

    def report(i: int, status: str) -> None:
        nonlocal reported
        reported += 1
        run, summary = runs[i], summaries[i]
        rows = [_row(runs[j], s) for j, s in summaries.items() if s is not None]
        write_results(rows, out)
        print(
            f"[{reported}/{len(runs)}] {run.variant} lr {run.lr:g} seed {run.seed}: val ppl "
            f"{summary['val_ppl']:.2f} | {summary['kv_bytes_per_token']:,} KV B/token | "
            f"{summary['tokens_per_s']:,.0f} tok/s | {status} | "
            f"{time.perf_counter() - started:,.0f} s elapsed",
            flush=True,
        )

    for i in sorted(set(summaries) - set(pending)):
        report(i, "done before")
    try:
        while pending or active:
            while pending and len(active) < parallel:
                i = pending.pop(0)
                active[i] = _start(runs[i], grid.base, out)
            i, returncode = _next_done(active)
            del active[i]
            summaries[i] = _collect(runs[i], out, returncode)
            report(i, "trained")
    finally:
        for proc in active.values():  # a failed run stops the sweep; the others resume later
            proc.terminate()
            proc.wait()
    return [_row(run, summaries[i]) for i, run in enumerate(runs)]
