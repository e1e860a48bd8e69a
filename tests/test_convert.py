"""``megatron-cla convert gpt-to-hybrid``: a GPT CLA run becomes the equivalent `*-`
HybridModel run with identical logits, and training continues the GPT run's loss curve."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from megatron_cla.testing import run_on_ranks
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample
from tests.hybrid_helpers import requires_hybrid
from tests.pretrain_worker import (
    pretrain_file_on_rank,
    pretrain_on_rank,
    step_losses,
    tiny_overrides,
)

pytestmark = requires_hybrid


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepared_corpus_sample(tmp_path_factory.mktemp("convert_data"), 300, 512)


@pytest.fixture(scope="module")
def gpt_run(data_dir, tmp_path_factory) -> Path:
    """A tiny GPT run without sharing (S = 1: Megatron's stacked checkpoint keys; the CLA2
    per-layer keys come from ``pp2_gpt_run``): 12 steps, checkpoints at 6 and 12."""
    run = tmp_path_factory.mktemp("convert") / "gpt"
    extra = ("checkpoint.save_interval=6", "model.cla_share_factor=1")
    overrides = tiny_overrides(run, data_dir, 12, *extra)
    run_on_ranks(pretrain_on_rank, 1, [*overrides, "logging.log_interval=1"], timeout=600)
    return run


def _convert(*args: str) -> subprocess.CompletedProcess:
    return run_command("convert", "gpt-to-hybrid", *args)


def _logits(run: Path) -> torch.Tensor:
    """Logits of a fixed batch from the newest checkpoint of ``run``, loaded at TP 1."""
    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.run_dir import find_checkpoint, serving_config

    checkpointer, iteration = find_checkpoint(run)
    plan = make_plan(serving_config(checkpointer.saved_run(iteration)["config"], 1), 1)
    model = build_model_chunk(plan, 512).eval()
    checkpointer.load_weights(iteration, [model])
    tokens = torch.arange(40).remainder(500)[None]
    with torch.no_grad():
        return model(tokens, torch.arange(40)[None], None)


@pytest.fixture(scope="module")
def converted(gpt_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("converted") / "hybrid"
    return out, _convert("--checkpoint", str(gpt_run), "--out", str(out))


def test_converted_model_gives_identical_logits(gpt_run, converted, single_rank):
    out, proc = converted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hybrid_layer_pattern '*-*-*-*-'" in proc.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["arch"] == "hybrid" and config["model"]["cla_share_factor"] == 1
    assert torch.equal(_logits(out), _logits(gpt_run))


def test_converted_run_continues_the_gpt_loss_curve(gpt_run, data_dir, tmp_path):
    """Convert the step-6 checkpoint, train the hybrid run to step 12: steps 7-12 repeat the
    GPT run's losses (weights, Adam state, LR schedule and data position all carried over)."""
    middle = tmp_path / "gpt_at_6"
    shutil.copytree(gpt_run, middle)
    shutil.rmtree(middle / "checkpoints/iter_0000012")
    proc = _convert("--checkpoint", str(middle), "--out", str(tmp_path / "hybrid"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = str(tmp_path / "hybrid/config.yaml")
    run_on_ranks(pretrain_file_on_rank, 1, config, ["logging.log_interval=1"], timeout=600)
    gpt, hybrid = step_losses(gpt_run), step_losses(tmp_path / "hybrid")
    assert sorted(hybrid) == list(range(7, 13))
    assert [hybrid[s] for s in range(7, 13)] == [gpt[s] for s in range(7, 13)]


def test_pipelined_cla_run_converts_with_segments(pp2_gpt_run, tmp_path, single_rank):
    """A PP2 CLA2 run (per-layer checkpoint keys) becomes `*-*-|*-*-` (its two stages), with
    the same logits."""
    proc = _convert("--checkpoint", str(pp2_gpt_run), "--out", str(tmp_path / "hybrid"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hybrid_layer_pattern '*-*-|*-*-'" in proc.stdout
    config = yaml.safe_load((tmp_path / "hybrid/config.yaml").read_text())
    assert config["model"]["cla_share_factor"] == 2
    assert torch.equal(_logits(tmp_path / "hybrid"), _logits(pp2_gpt_run))


def test_bad_inputs_are_one_line_errors(gpt_run, converted, tmp_path):
    """(A missing checkpoint: tests/test_cli.py.)"""
    (tmp_path / "full").mkdir()
    (tmp_path / "full/file").write_text("x")
    busy = _convert("--checkpoint", str(gpt_run), "--out", str(tmp_path / "full"))
    assert busy.returncode == 1 and "exists and is not empty" in busy.stderr
    again = _convert("--checkpoint", str(converted[0]), "--out", str(tmp_path / "y"))
    assert again.returncode == 1 and "already a model.arch='hybrid' run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
