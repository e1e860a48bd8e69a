"""Runs that go wrong stay safe: a step whose loss or gradients are not finite changes nothing and
says so; ``train.max_skipped_steps`` such steps in a row stop the run (exit status 1, one line
naming the last good checkpoint); a checkpoint with non-finite weights is never written, so
retention never deletes the last good one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.distributed import RankFailure, init_process_group_once
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample
from tests.pretrain_worker import TINY_RUN

NAN_STEP = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepared_corpus_sample(tmp_path_factory.mktemp("safe_runs"), 200, 500)


def _overrides(run: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [
        *TINY_RUN,
        f"train.train_iters={steps}",
        f"logging.run_dir={run}",
        f"data.dir={data}",
        "logging.log_interval=1",
        "checkpoint.save_interval=1",
        *extra,
    ]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    from megatron_cla.training.checkpoint import Checkpointer
    from megatron_cla.training.weights import load_parameters, one_process_config, saved_run_config

    init_process_group_once()
    checkpointer = Checkpointer(run / "checkpoints")
    cfg = one_process_config(saved_run_config(checkpointer, iteration))
    return load_parameters(cfg, checkpointer, iteration)[0]


def pretrain_with_a_nan_loss(overrides: list[str]) -> Any:
    """The launcher with the loss of step ``NAN_STEP`` made NaN (every microbatch)."""
    import megatron_cla.training.loop as loop
    from megatron_cla.training.config import load_config
    from megatron_cla.training.pretraining import run_pretraining

    def poisoned(data_iterator: Any, model: Any) -> Any:
        output, loss_func = loop.forward_step(data_iterator, model)
        if loop_state["step"] == NAN_STEP - 1:  # iterations done before this step
            output = output * float("nan")
        return output, loss_func

    loop_state = {"step": 0}
    step = loop._train_step

    def counted(run: Any) -> Any:
        loop_state["step"] = run.state.iteration
        run.train_forward_step = poisoned
        return step(run)

    loop._train_step = counted
    return run_pretraining(load_config(None, overrides))


def pretrain_with_weights_gone_bad(overrides: list[str]) -> Any:
    """The launcher whose weights become infinite after step 3's update."""
    import megatron_cla.training.loop as loop
    from megatron_cla.training.config import load_config
    from megatron_cla.training.pretraining import run_pretraining

    step = loop._train_step

    def spoiled(run: Any) -> Any:
        result = step(run)
        if run.state.iteration == 3:
            with torch.no_grad():
                next(run.chunks[0].parameters()).fill_(float("inf"))
        return result

    loop._train_step = spoiled
    return run_pretraining(load_config(None, overrides))


def test_a_nan_step_is_skipped_and_training_goes_on(data_dir, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(run, data_dir, 5, "checkpoint.keep=10")
    run_on_ranks(pretrain_with_a_nan_loss, 1, overrides, timeout=600)
    rows = {r["step"]: r for r in _rows(run) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[NAN_STEP].get("skipped") is True and math.isnan(rows[NAN_STEP]["loss"])
    assert all("skipped" not in rows[s] and math.isfinite(rows[s]["loss"]) for s in (1, 2, 4, 5))
    before, after = _weights(run, NAN_STEP - 1), _weights(run, NAN_STEP)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at all
    final = _weights(run, 5)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert not all(torch.equal(after[k], final[k]) for k in after)  # training went on


def test_non_finite_weights_are_never_saved(data_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(pretrain_with_weights_gone_bad, 1, _overrides(run, data_dir, 6), timeout=600)
    assert "step 3: the weights are not finite, so no checkpoint was written" in str(caught.value)
    from megatron_cla.training.checkpoint import Checkpointer

    assert Checkpointer(run / "checkpoints").complete_iterations() == [1, 2]


def test_an_absurd_learning_rate_stops_the_run_in_one_line(data_dir, tmp_path):
    """``train.lr=1e4``: the weights blow up, every later step is skipped, and the run stops
    with exit status 1 after ``max_skipped_steps`` + 1 of them, its checkpoints all finite."""
    run = tmp_path / "run"
    extra = ("train.lr=1e4", "train.min_lr=1e3", "train.max_skipped_steps=2")
    proc = run_command("pretrain", *_overrides(run, data_dir, 30, *extra), timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "steps in a row had a non-finite loss or gradient" in lines[0]
    assert lines[0].startswith("pretrain: step ")
    assert "(train.max_skipped_steps=2)" in lines[0] and "has finite weights" in lines[0]
    assert "skipped: non-finite loss or gradient, no update" in proc.stdout
    skipped = [r["step"] for r in _rows(run) if r.get("skipped")]
    assert len(skipped) >= 3 and skipped[-3:] == list(range(skipped[-1] - 2, skipped[-1] + 1))
    from megatron_cla.training.checkpoint import Checkpointer

    kept = Checkpointer(run / "checkpoints").complete_iterations()
    assert kept and all(
        all(torch.isfinite(t).all() for t in _weights(run, i).values()) for i in kept
    )


def test_a_negative_max_skipped_steps_is_refused():
    from megatron_cla.training.config import load_config
    from megatron_cla.training.plan import make_plan

    with pytest.raises(ValueError, match=r"train.max_skipped_steps=-1 must be >= 0"):
        make_plan(load_config(None, ["train.max_skipped_steps=-1"]), 1, on_gpu=False)
