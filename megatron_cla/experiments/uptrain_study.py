"""How cheaply does continued training recover a model converted to CLA?
(``megatron-cla uptrain-study --plan configs/uptrain/X.yaml``)

For every seed the study

1. pretrains the source model (no CLA) with ``pretrain`` overrides;
2. trains the CLA model from scratch on the same total tokens (pretraining plus the longest
   uptraining), with the same schedule shape;
3. converts the source with each ``kv_inits`` entry (``convert to-cla --cla-share-factor S``);
4. uptrains each conversion with each method (its overrides: attention-only, a teacher, ...) for
   the largest of ``fractions`` of the pretraining steps, evaluating before the first step and at
   every fraction. The uptraining learning rate is constant after its warm-up, so the point at a
   smaller fraction is the run that would have stopped there (without a final decay).

Every run is one ``megatron-cla`` process with its log in its directory; finished runs are
skipped, so the command can be re-run until the study is done. ``results.json`` holds one row per
validation point. The plan file::

    name: cpu_small
    base: configs/tiny_mqa.yaml
    common: [model.num_layers=6, data.dir=runs/data/default, ...]   # every run
    seeds: [1, 2, 3]
    pretrain: [train.train_iters=400, train.warmup_iters=20]        # the source and scratch runs
    share_factor: 2
    kv_inits: [mean, first]
    fractions: [0.05, 0.1, 0.25]
    uptrain: [train.lr=5e-4, train.lr_decay_style=constant, train.warmup_iters=5]
    methods:                       # name -> overrides; {source} is the seed's source run
      continue: []
      continue-attention: [uptrain.trainable=attention]
      distil: ["uptrain.teacher={source}"]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_cla.training.config import load_config
from megatron_cla.training.run_dir import copy_run

__all__ = ["StudyPlan", "StudyRun", "load_plan", "plan_runs", "run_study", "collect_results"]


@dataclasses.dataclass
class StudyPlan:
    """An uptraining study (see the module docstring)."""

    name: str
    """Shown in logs and the report."""
    base: str
    """Base pretraining config (YAML path) of the source model."""
    common: list[str]
    """Overrides of every run: model shape, data, batch, evaluation."""
    seeds: list[int]
    """One replicate per seed: its own source, scratch run, conversions and uptraining."""
    pretrain: list[str]
    """Overrides of the source and scratch runs; ``train.train_iters`` sets the budget."""
    share_factor: int
    """CLA share factor S of the conversions and the scratch model."""
    kv_inits: list[str]
    """``mean`` and/or ``first``: how the producers' K/V are initialised."""
    fractions: list[float]
    """Uptraining lengths as fractions of the pretraining steps (evaluated along one run)."""
    uptrain: list[str]
    """Overrides of every uptraining run (learning rate, constant schedule, warm-up)."""
    methods: dict[str, list[str]]
    """Uptraining method name -> overrides (``{source}``: the seed's source run directory)."""

    @functools.cached_property
    def pretrain_iters(self) -> int:
        """Steps of the source's pretraining."""
        return load_config(Path(self.base), [*self.common, *self.pretrain]).train.train_iters

    @functools.cached_property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step (every run of the study shares it)."""
        cfg = load_config(Path(self.base), [*self.common, *self.pretrain])
        return cfg.train.global_batch_size * cfg.model.seq_length

    def fraction_steps(self) -> list[int]:
        """Uptraining steps at each fraction (at least one step each)."""
        return [max(1, round(f * self.pretrain_iters)) for f in self.fractions]


@dataclasses.dataclass
class StudyRun:
    """One process of the study."""

    kind: str
    """``source``, ``scratch``, ``convert`` or ``uptrain``."""
    seed: int
    directory: Path
    argv: list[str]
    """``megatron-cla`` arguments."""
    init: str = ""
    method: str = ""

    def done(self) -> bool:
        """Whether an earlier invocation finished this run."""
        if self.kind == "convert":
            return (self.directory / "config.yaml").is_file()
        return (self.directory / "summary.json").is_file()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def load_plan(path: Path) -> StudyPlan:
    """Read and check a plan file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    fields = {f.name for f in dataclasses.fields(StudyPlan)}
    _require(not set(raw) - fields, f"{path}: unknown key(s) {sorted(set(raw) - fields)}")
    missing = sorted(fields - set(raw))
    _require(not missing, f"{path}: missing key(s) {missing}")
    plan = StudyPlan(
        name=str(raw["name"]),
        base=str(raw["base"]),
        common=[str(o) for o in raw["common"] or []],
        seeds=[int(s) for s in raw["seeds"]],
        pretrain=[str(o) for o in raw["pretrain"] or []],
        share_factor=int(raw["share_factor"]),
        kv_inits=[str(i) for i in raw["kv_inits"]],
        fractions=sorted(float(f) for f in raw["fractions"]),
        uptrain=[str(o) for o in raw["uptrain"] or []],
        methods={str(k): [str(o) for o in v or []] for k, v in raw["methods"].items()},
    )
    _require(len(set(plan.seeds)) == len(plan.seeds) >= 1, f"{path}: seeds must be distinct")
    _require(plan.share_factor >= 2, f"{path}: share_factor must be >= 2")
    _require(set(plan.kv_inits) <= {"mean", "first"}, f"{path}: kv_inits are mean and/or first")
    _require(all(0 < f <= 1 for f in plan.fractions), f"{path}: fractions must be in (0, 1]")
    _require(
        len(set(plan.fraction_steps())) == len(plan.fractions),
        f"{path}: fractions {plan.fractions} give the same step counts",
    )
    _require(bool(plan.methods), f"{path}: give at least one method")
    return plan


def _pretrain_argv(plan: StudyPlan, directory: Path, seed: int, *extra: str) -> list[str]:
    overrides = [
        *plan.common,
        *plan.pretrain,
        *extra,
        f"train.seed={seed}",
        f"logging.run_dir={directory}",
        "logging.progress_bar=false",
    ]
    load_config(Path(plan.base), overrides)  # keys and types checked now, not mid-study
    return ["pretrain", "--config", plan.base, *overrides]


def plan_runs(plan: StudyPlan, out: Path) -> list[StudyRun]:
    """Every process of the study, in the order they must run."""
    runs = []
    steps = plan.fraction_steps()
    interval = steps[0] if all(s % steps[0] == 0 for s in steps) else 1
    for seed in plan.seeds:
        root = out / f"seed{seed}"
        source = root / "source"
        runs.append(StudyRun("source", seed, source, _pretrain_argv(plan, source, seed)))
        scratch_iters = plan.pretrain_iters + steps[-1]
        runs.append(
            StudyRun(
                "scratch",
                seed,
                root / "scratch",
                _pretrain_argv(
                    plan,
                    root / "scratch",
                    seed,
                    f"model.cla_share_factor={plan.share_factor}",
                    f"train.train_iters={scratch_iters}",
                ),
            )
        )
        for init in plan.kv_inits:
            converted = root / f"converted-{init}"
            runs.append(
                StudyRun(
                    "convert",
                    seed,
                    converted,
                    [
                        "convert",
                        "to-cla",
                        "--checkpoint",
                        str(source),
                        "--out",
                        str(converted),
                        "--cla-share-factor",
                        str(plan.share_factor),
                        "--kv-init",
                        init,
                    ],
                    init,
                )
            )
            for method, overrides in plan.methods.items():
                directory = root / f"{init}-{method}"
                argv = [
                    "pretrain",
                    "--config",
                    str(directory / "config.yaml"),
                    *plan.uptrain,
                    *(o.replace("{source}", str(source)) for o in overrides),
                    f"train.train_iters={steps[-1]}",
                    f"logging.eval_interval={interval}",
                    "logging.eval_at_start=true",
                    "logging.progress_bar=false",
                ]
                runs.append(StudyRun("uptrain", seed, directory, argv, init, method))
    return runs


def _copy_conversion(run: StudyRun, out: Path) -> None:
    """An uptraining run starts as a copy of its conversion (its own directory to write in)."""
    if run.directory.exists():  # interrupted: start again from the conversion
        shutil.rmtree(run.directory)
    copy_run(out / f"seed{run.seed}" / f"converted-{run.init}", run.directory)


def _execute(run: StudyRun, out: Path) -> None:
    if run.kind == "uptrain":
        _copy_conversion(run, out)
    elif run.kind != "convert":
        run.directory.mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / f"seed{run.seed}-{run.directory.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(
            [sys.executable, "-m", "megatron_cla", *run.argv], stdout=log, stderr=subprocess.STDOUT
        )
    if code != 0:
        raise RuntimeError(f"{run.kind} run {run.directory} failed (exit {code}); see {log_path}")


def run_study(plan: StudyPlan, out: Path) -> list[dict[str, Any]]:
    """Run every unfinished process of the study in order; returns the result rows."""
    runs = plan_runs(plan, out)
    started = time.perf_counter()
    for index, run in enumerate(runs, 1):
        label = f"[{index}/{len(runs)}] seed {run.seed} {run.directory.name}"
        if run.done():
            print(f"{label}: done before", flush=True)
            continue
        _execute(run, out)
        print(f"{label}: done | {time.perf_counter() - started:,.0f} s elapsed", flush=True)
        rows = collect_results(plan, out)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    return collect_results(plan, out)


def _validation_points(run_dir: Path) -> dict[int, float]:
    """Validation perplexity by step from a run's metrics.jsonl."""
    points = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_ppl" in row:
            points[row["step"]] = row["val_ppl"]
    return points


def collect_results(plan: StudyPlan, out: Path) -> list[dict[str, Any]]:
    """One row per validation point of the finished runs: the source and scratch models at
    their end, every uptraining run before its first step and at each fraction."""
    rows = []
    tokens_per_step = plan.tokens_per_step
    steps = plan.fraction_steps()
    for run in plan_runs(plan, out):
        if run.kind == "convert" or not run.done():
            continue
        points = _validation_points(run.directory)
        if run.kind != "uptrain":
            last = max(points)
            rows.append(
                {
                    "seed": run.seed,
                    "model": run.kind,
                    "steps": last,
                    "tokens": last * tokens_per_step,
                    "val_ppl": points[last],
                }
            )
            continue
        for fraction, step in zip([0.0, *plan.fractions], [0, *steps], strict=True):
            rows.append(
                {
                    "seed": run.seed,
                    "model": "uptrain",
                    "init": run.init,
                    "method": run.method,
                    "fraction": fraction,
                    "steps": step,
                    "tokens": step * tokens_per_step,
                    "val_ppl": points[step],
                }
            )
    return rows
