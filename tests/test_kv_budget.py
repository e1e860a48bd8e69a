"""The KV budget planner: its numbers are what Megatron's paged context really allocates, its
per-token bytes are the paper's, and the command prints both models and writes the plot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megatron_cla._compat import hybrid_model_available
from megatron_cla.inference.budget import GIB, no_cla_twin, parse_bytes, plan_budget
from megatron_cla.testing import run_on_ranks
from megatron_cla.training.config import load_config
from tests.commands import run_command
from tests.hybrid_helpers import requires_hybrid
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
    return run_command("kv-budget", *args, timeout=300)


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


HYBRID = ["model.arch=hybrid", "model.num_layers=null"]
HYBRID_MODELS = {
    "hybrid S1": [*HYBRID, "model.hybrid_layer_pattern=*-*-*-*-*-*-", "model.cla_share_factor=1"],
    "hybrid S2": [*HYBRID, "model.hybrid_layer_pattern=*-*-*-*-*-*-", "model.cla_share_factor=2"],
    "hybrid MoE S3": [
        *HYBRID,
        "model.hybrid_layer_pattern=*E*-*E*-*E",
        "model.cla_share_factor=3",
        "model.num_experts=2",
    ],
}


@requires_hybrid
@pytest.mark.parametrize("model", HYBRID_MODELS)
def test_planner_matches_the_hybrid_paged_cache(model):
    overrides = [*TINY, *HYBRID_MODELS[model]]
    budget = _predicted(HYBRID_MODELS[model])
    _assert_matches(budget, allocated_paged_cache(overrides, BUFFER_GB, BLOCK))
    assert budget.producers.endswith("attention layers (12 layers)" if "S3" not in model else "")


@requires_hybrid
@pytest.mark.distributed
def test_planner_matches_hybrid_pipeline_segments():
    """`*-*-*-*-|*-*-` with CLA2: the stages hold 2 and 1 producer attention layers."""
    layout = [
        *HYBRID,
        "model.hybrid_layer_pattern=*-*-*-*-|*-*-",
        "model.cla_share_factor=2",
        "parallel.pipeline=2",
    ]
    ranks = run_on_ranks(allocated_paged_cache, 2, [*TINY, *layout], BUFFER_GB, BLOCK)
    assert [r["kv_layers"] for r in sorted(ranks, key=lambda r: r["pp_rank"])] == [2, 1]
    _assert_matches(_predicted(layout), max(ranks, key=lambda r: r["kv_layers"]))


def _hybrid_context(max_requests):
    """Megatron's allocation for a CLA2 stand-in-Mamba model: (context, state bytes/request)."""
    from megatron_cla.inference import CLADynamicInferenceContext
    from tests.inference_worker import _model

    net = _model(dict(hybrid_layer_pattern="*-M*-*M*-", cla_share_factor=2))
    ctx = CLADynamicInferenceContext.for_model(
        net, max_sequence_length=64, buffer_size_gb=BUFFER_GB, block_size_tokens=BLOCK,
        max_requests=max_requests,
    )  # fmt: skip
    states = ctx.mamba_conv_states.numel() + ctx.mamba_ssm_states.numel()
    return ctx, states * ctx.mamba_ssm_states.element_size() // ctx.max_requests


@requires_hybrid
def test_mamba_state_sizing_follows_megatron(single_rank):
    """Megatron reserves one request's Mamba state per block when it sizes the buffer itself,
    and exactly ``max_requests`` states when told; the planner's block counts follow both."""
    from megatron_cla.inference.budget import KVBudget

    ctx, state = _hybrid_context(None)
    buffer = int(BUFFER_GB * GIB)
    budget = KVBudget(
        "x", "", 0, ctx.num_attention_layers, 1, ctx.block_size_bytes, BLOCK, 0, buffer,
        max(2, buffer // (ctx.block_size_bytes + state)), state,
    )  # fmt: skip
    assert budget.total_blocks == ctx.kv_block_allocator.total_count
    for requests in (4, 8):
        served, _ = _hybrid_context(requests)
        assert budget.blocks_serving(requests) == served.kv_block_allocator.total_count - 1
    n = budget.max_sequences(64)  # 4 blocks each: the most that fit, one more does not
    assert budget.blocks_serving(n) >= n * 4 and budget.blocks_serving(n + 1) < (n + 1) * 4


def test_hybrid_planner_counts_mamba_state_and_attention_producers():
    cfg = load_config(ROOT / "configs/nemotron_h_style_2b_cla2.yaml")
    if cfg.model.arch == "hybrid" and not hybrid_model_available():
        pytest.skip("HybridModel does not exist in this megatron-core (it needs 0.19 or newer)")
    budget, twin = (
        plan_budget(cfg, parse_bytes("80GB")),
        plan_budget(no_cla_twin(cfg), parse_bytes("80GB")),
    )
    assert budget.producers == "4 of 8 attention layers (56 layers)"
    assert 2 * budget.kv_bytes_per_token == twin.kv_bytes_per_token == 2 * 8 * 128 * 8 * 2
    # 24 Mamba layers: conv (4096 + 2*8*128 channels x 4) + SSM (64 heads x 64 x 128), bf16
    assert budget.state_bytes_per_sequence == 24 * ((4096 + 2048) * 4 + 64 * 64 * 128) * 2
    assert budget.block_bytes * 2 == twin.block_bytes


@requires_hybrid
def test_command_plans_a_hybrid_mamba_config(tmp_path):
    proc = _cli(
        "--config", "configs/nemotron_h_style_2b_cla2.yaml", "--plot", str(tmp_path / "p.png")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 of 8 attention layers (56 layers)" in proc.stdout
    assert "Mamba state per sequence" in proc.stdout
    assert "serves 2.00x the concurrent 131,072-token sequences" in proc.stdout
