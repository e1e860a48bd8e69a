"""CLA HybridModels in Megatron-Core's inference stack: the KV cache holds producer attention
layers only, Mamba-slot layers keep the state Megatron gives them, and KV-cached greedy decoding
equals greedy decoding by full no-cache forwards (static context, paged context with
DynamicInferenceEngine, StaticInferenceEngine; TP1 and TP2). On a CPU the Mamba slots hold the
stand-in mixer of ``tests/hybrid_helpers.py``, which keeps its state where Megatron keeps Mamba's.
"""

from __future__ import annotations

import pytest

from megatron_cla.testing import run_on_ranks
from tests.hybrid_helpers import requires_hybrid
from tests.inference_worker import generate_on_rank, prompts

pytestmark = requires_hybrid

PATTERN = "*-M*-*M*-*-M*-"  # attention layers 1 4 6 8 10 13; Mamba slots 3 7 12
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64, add_bias_linear=False)
MODELS = {
    "S1": dict(hybrid_layer_pattern=PATTERN, cla_share_factor=1),
    "S2": dict(hybrid_layer_pattern=PATTERN, cla_share_factor=2),
    "S3": dict(hybrid_layer_pattern=PATTERN, cla_share_factor=3),
    "KeepEnds-GQA": dict(
        hybrid_layer_pattern=PATTERN, cla_producer_layers=[1, 2, 4, 6], num_query_groups=2
    ),
    "MoE-S1": dict(hybrid_layer_pattern="*E*-*E*-", cla_share_factor=1, **MOE),
    "MoE-S2": dict(hybrid_layer_pattern="*E*-*E*-", cla_share_factor=2, **MOE),
}
PRODUCER_POSITIONS = {  # 1-based pattern positions of the producer attention layers
    "S1": [1, 4, 6, 8, 10, 13],
    "S2": [1, 6, 10],
    "S3": [1, 8],
    "KeepEnds-GQA": [1, 4, 8, 13],
    "MoE-S1": [1, 3, 5, 7],
    "MoE-S2": [1, 5],
}
MAMBA_POSITIONS = [3, 7, 12]


def _run(runner: str, model: str, batch: list[list[int]], tp: int = 1) -> dict:
    out = generate_on_rank(runner, MODELS[model], batch, tp)
    assert out["generated"] == out["reference"], f"{runner}/{model}: cache != no-cache greedy"
    return out


@pytest.mark.parametrize("model", ["S2", "S3", "KeepEnds-GQA", "MoE-S2"])
def test_static_context_caches_producers_only(single_rank, model):
    out = _run("static-context", model, prompts((7, 7, 7)))
    base = _run("static-context", "MoE-S1" if "MoE" in model else "S1", prompts((7, 7, 7)))
    producers, every = PRODUCER_POSITIONS[model], base["cached_layers"]
    assert out["cached_layers"] == producers
    per_layer = base["cached_bytes"] // len(every)
    if "GQA" not in model:  # same KV heads as the S = 1 model: exactly the producers' share
        assert out["cached_bytes"] == per_layer * len(producers)
    assert out["state_layers"] == ([] if "MoE" in model else MAMBA_POSITIONS)


@pytest.mark.parametrize("model", ["S1", "S2", "S3", "KeepEnds-GQA", "MoE-S2"])
def test_dynamic_engine_maps_producers_and_mamba_states(single_rank, model):
    out = _run("dynamic-engine", model, prompts((5, 9, 3)))
    producers = PRODUCER_POSITIONS[model]
    assert out["kv_slots"] == len(producers)
    kv = {p - 1: slot for slot, p in enumerate(producers)}
    mamba = {} if "MoE" in model else {p - 1: i for i, p in enumerate(MAMBA_POSITIONS)}
    # local index -> KV slot for producers, -> Mamba state slot for Mamba layers, nothing else
    assert out["layer_map"] == kv | mamba


def test_mamba_state_slots_are_megatrons(single_rank):
    """The CLA context gives each request the Mamba state Megatron's own context gives it, and
    fits more requests into the same buffer (fewer KV layers per block)."""
    out = generate_on_rank("context-layout", MODELS["S2"], [])
    cla, stock = out["cla"], out["stock"]
    assert cla["mamba_layers"] == stock["mamba_layers"] == len(MAMBA_POSITIONS)
    assert cla["mamba_map"] == stock["mamba_map"]
    per_request = [c["mamba_state_bytes"] / c["max_requests"] for c in (cla, stock)]
    assert per_request[0] == per_request[1] > 0
    assert (stock["kv_layers"], cla["kv_layers"]) == (6, 3)
    assert cla["max_requests"] > stock["max_requests"]


def test_fixed_buffer_fits_s_times_more_blocks(single_rank):
    s1 = _run("dynamic-engine", "MoE-S1", prompts((5,)))
    s2 = _run("dynamic-engine", "MoE-S2", prompts((5,)))
    assert s1["block_bytes"] == 2 * s2["block_bytes"]
    blocks = [o["kv_bytes"] // o["block_bytes"] for o in (s1, s2)]
    assert blocks[1] >= 2 * blocks[0], blocks


@pytest.mark.parametrize("runner", ["static-engine", "static-engine-legacy"])
@pytest.mark.parametrize("model", ["S2", "MoE-S2"])
def test_static_engine_greedy_decode(single_rank, runner, model):
    _run(runner, model, prompts((5, 9, 3)))


@pytest.mark.distributed
def test_tensor_parallel_greedy_decode():
    """TP 2: both ranks decode the no-cache greedy tokens (each holds half the KV heads and
    its share of the stand-in's Mamba state)."""
    ranks = run_on_ranks(generate_on_rank, 2, "dynamic-engine", MODELS["S3"], prompts((5, 9)), 2)
    for out in ranks:
        assert out["generated"] == out["reference"]
    assert ranks[0]["generated"] == ranks[1]["generated"]
