"""The KV budget planner: its numbers are what Megatron's paged context really allocates, its
per-token bytes are the paper's, and the command prints both models and writes the plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cla.kv_budget import GIB, no_cla_twin, parse_bytes, plan_budget
from megatron_cla.testing import run_on_ranks
from megatron_cla.training.config import load_config
from tests.inference_worker import allocated_paged_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=6", "model.hidden_size=64", "model.num_attention_heads=4"]
MODELS = {
    "S1-MQA": ["model.cla_share_factor=1"],
    "S2-MQA": ["model.cla_share_factor=2"],
    "S3-MQA": ["model.cla_share_factor=3"],
    "S2-GQA": ["model.cla_share_factor=2", "model.num_query_groups=2"],
    "KeepEnds-GQA": ["model.cla_producer_layers=[1,2,4,6]", "model.num_query_groups=2"],
}
PIPELINED = {**MODELS, "DenseFront-MQA": ["model.cla_producer_layers=[1,2,3,4,5]"]}
BUFFER_GB, BLOCK = 0.003, 16


def _predicted(overrides: list[str]):
    cfg = load_config(None, [*TINY, *overrides])
    return plan_budget(
        cfg,
        0,
        vocab_size=512,
        kv_dtype="fp32",  # CPU models hold K/V in fp32
        block_size_tokens=BLOCK,
        buffer_bytes=int(BUFFER_GB * GIB),
    )


def _assert_matches(budget, allocated: dict) -> None:
    assert allocated["kv_layers"] == budget.kv_layers_per_gpu
    assert allocated["block_bytes"] == budget.block_bytes
    assert allocated["total_blocks"] == budget.total_blocks
    assert allocated["kv_bytes"] == budget.total_blocks * budget.block_bytes


@pytest.mark.parametrize("model", MODELS)
def test_planner_matches_the_allocated_paged_cache(model):
    overrides = [*TINY, *MODELS[model]]
    _assert_matches(_predicted(MODELS[model]), allocated_paged_cache(overrides, BUFFER_GB, BLOCK))


@pytest.mark.distributed
@pytest.mark.parametrize(
    "model,layout",
    [
        ("S2-MQA", "parallel.tensor=2"),  # one KV head, replicated on both TP ranks
        ("S2-GQA", "parallel.tensor=2"),  # one KV head per TP rank
        ("KeepEnds-GQA", "parallel.pipeline=2"),  # stages hold 2 and 2 producers
        ("DenseFront-MQA", "parallel.pipeline=2"),  # stages hold 3 and 2 producers
    ],
)
def test_planner_matches_every_rank_in_parallel(model, layout):
    overrides = [*TINY, *PIPELINED[model], layout]
    ranks = run_on_ranks(allocated_paged_cache, 2, overrides, BUFFER_GB, BLOCK, timeout=300)
    budget = _predicted([*PIPELINED[model], layout])
    # Every rank allocates the same buffer; the most loaded stage sets the planner's slots.
    assert max(r["kv_layers"] for r in ranks) == budget.kv_layers_per_gpu
    _assert_matches(budget, max(ranks, key=lambda r: r["kv_layers"]))
    if "pipeline" in layout:
        expected = {"KeepEnds-GQA": [2, 2], "DenseFront-MQA": [3, 2]}[model]
        assert [r["kv_layers"] for r in sorted(ranks, key=lambda r: r["pp_rank"])] == expected


@pytest.mark.parametrize(
    "config,bytes_per_token",
    [
        ("paper_1b_h128_mqa", 10240),
        ("paper_1b_h64_mqa", 5120),
        ("paper_1b_h128_mqa_cla2", 5120),
        ("paper_1b_h256_mqa_cla2", 10240),
        ("paper_1b_h512_mqa_cla2", 20480),
    ],
)
def test_bytes_per_token_are_the_papers(config, bytes_per_token):
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    budget = plan_budget(cfg, parse_bytes("80GB"))
    twin = plan_budget(no_cla_twin(cfg), parse_bytes("80GB"))
    assert budget.kv_bytes_per_token == bytes_per_token
    s = cfg.model.cla_share_factor
    assert twin.kv_bytes_per_token == s * bytes_per_token
    # The same memory holds S times the tokens (up to the dummy block and rounding).
    assert budget.usable_blocks >= s * twin.usable_blocks


def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="cannot read a size from 'lots'"):
        parse_bytes("lots")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_cla.kv_budget", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_command_prints_both_models_and_writes_the_plot(tmp_path):
    png = tmp_path / "budget.png"
    proc = _cli(
        "--config", "configs/paper_1b_h128_mqa_cla2.yaml", "--gpu-mem", "80GB", "--plot", str(png)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1b_h128_mqa_cla2 (no CLA)" in proc.stdout
    assert "KV bytes/token (whole model)" in proc.stdout and "5,120" in proc.stdout
    assert "fits 2.00x the tokens" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_command_reports_a_gpu_too_small_for_the_weights(tmp_path):
    proc = _cli("--config", "configs/paper_3b_h128_mqa.yaml", "--gpu-mem", "4GB")
    assert proc.returncode != 0
    assert "leave no memory for a KV cache on a 4GB GPU" in proc.stderr
