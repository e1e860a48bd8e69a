"""CLA in Megatron-Core's inference stack: the KV cache holds producers only, and KV-cached greedy
decoding equals greedy decoding by full no-cache forwards, through Megatron's own engines."""

from __future__ import annotations

import pytest
import torch

from megatron_cla.inference import paged_attention
from megatron_cla.testing import run_on_ranks
from tests.helpers import VOCAB
from tests.inference_worker import RUNNERS, generate_on_rank, prompts, suppressed_rows

MODELS = {
    "S1-MQA": dict(cla_share_factor=1),
    "S2-MQA": dict(cla_share_factor=2),
    "S3-MQA": dict(cla_share_factor=3),
    "S2-GQA": dict(cla_share_factor=2, num_query_groups=2),
    "KeepEnds-GQA": dict(cla_producer_layers=[1, 2, 4, 6], num_query_groups=2),
}
BASELINES = {"S1-GQA": dict(cla_share_factor=1, num_query_groups=2)}  # S=1 twin of the GQA models
PRODUCERS = {"S1-MQA": 6, "S2-MQA": 3, "S3-MQA": 2, "S2-GQA": 3, "KeepEnds-GQA": 4, "S1-GQA": 6}


def _run(runner: str, model: str, batch: list[list[int]]) -> dict:
    out = generate_on_rank(runner, {**MODELS, **BASELINES}[model], batch)
    assert out["generated"] == out["reference"], f"{runner}/{model}: cache != no-cache greedy"
    return out


@pytest.mark.parametrize("model", MODELS)
def test_static_context_caches_producers_only(single_rank, model):
    out = _run("static-context", model, prompts((7, 7, 7)))
    base = _run("static-context", "S1-MQA" if "MQA" in model else "S1-GQA", prompts((7, 7, 7)))
    n = PRODUCERS[model]
    assert len(out["cached_layers"]) == n
    assert out["cached_bytes"] * 6 == base["cached_bytes"] * n  # exactly the producers' share


@pytest.mark.parametrize("model", MODELS)
def test_dynamic_engine_slots_and_greedy_decode(single_rank, model):
    out = _run("dynamic-engine", model, prompts((5, 9, 3)))
    n = PRODUCERS[model]
    assert out["kv_slots"] == n
    # Only producers have a slot (local 0-based index -> slot); consumers read their producer's.
    assert sorted(out["layer_map"].values()) == list(range(n))
    assert len(out["layer_map"]) == n


def test_fixed_buffer_fits_s_times_more_blocks(single_rank):
    s1 = _run("dynamic-engine", "S1-MQA", prompts((5,)))
    s2 = _run("dynamic-engine", "S2-MQA", prompts((5,)))
    s3 = _run("dynamic-engine", "S3-MQA", prompts((5,)))
    assert s1["block_bytes"] == 2 * s2["block_bytes"] == 3 * s3["block_bytes"]
    blocks = [o["kv_bytes"] // o["block_bytes"] for o in (s1, s2, s3)]
    assert blocks[1] >= 2 * blocks[0] and blocks[2] >= 3 * blocks[0], blocks


@pytest.mark.parametrize("runner", ["static-engine", "static-engine-legacy"])
@pytest.mark.parametrize("model", ["S2-MQA", "KeepEnds-GQA"])
def test_static_engine_greedy_decode(single_rank, runner, model):
    _run(runner, model, prompts((5, 9, 3)))


def test_stock_paged_context_is_rejected(single_rank):
    """A context with a slot per layer would not shrink the cache: consumers refuse it."""
    from megatron_cla.inference import context as cla_context

    stock = cla_context.DynamicInferenceContext
    original = cla_context.CLADynamicInferenceContext.for_model
    with pytest.raises(ValueError, match="was not built for this model's producers"):
        try:
            cla_context.CLADynamicInferenceContext.for_model = classmethod(_stock_for_model(stock))
            generate_on_rank("dynamic-engine", MODELS["S2-MQA"], prompts((5,)))
        finally:
            cla_context.CLADynamicInferenceContext.for_model = original


@pytest.mark.distributed
@pytest.mark.parametrize("runner", ["dynamic-engine", "static-context"])
@pytest.mark.parametrize("model", ["S2-MQA", "S3-MQA", "KeepEnds-GQA"])
def test_tensor_parallel_greedy_decode(runner, model):
    batch = prompts((6, 6)) if runner == "static-context" else prompts((5, 9))
    ranks = run_on_ranks(generate_on_rank, 2, runner, MODELS[model], batch, 2)
    for out in ranks:
        assert out["generated"] == out["reference"]
    assert ranks[0]["generated"] == ranks[1]["generated"]


@pytest.mark.parametrize("tp", [1, 2])
def test_rows_without_text_are_never_generated(tp):
    """Rows past the tokenizer's vocabulary get -inf logits on every TP rank's slice (80 of 96
    rows: TP 2 splits them 48/48, so the second rank masks its last 16)."""
    for out in run_on_ranks(suppressed_rows, tp, tp, 80):
        assert out["width"] == VOCAB
        assert out["finite"] == [True] * 80 + [False] * (VOCAB - 80)
        assert out["minus_inf"] == [False] * 80 + [True] * (VOCAB - 80)


def test_paged_attention_matches_dense_causal_attention():
    """Against attention computed densely per request from unpaged K/V (plain PyTorch)."""
    g = torch.Generator().manual_seed(0)
    heads, groups, dim, block = 4, 2, 8, 4
    kv_lens, q_lens = [7, 3, 10], [7, 1, 2]  # a prefill, a decode step, a chunked prefill
    keys = [torch.randn(n, groups, dim, generator=g) for n in kv_lens]
    values = [torch.randn(n, groups, dim, generator=g) for n in kv_lens]
    cache_k, cache_v = torch.zeros(12, block, groups, dim), torch.zeros(12, block, groups, dim)
    order = torch.randperm(12, generator=g).tolist()  # blocks scattered through the buffer
    table = torch.full((3, 3), -1, dtype=torch.int32)
    for r, n in enumerate(kv_lens):
        for j in range(-(-n // block)):
            b = order.pop()
            table[r, j] = b
            rows = slice(j * block, min(n, (j + 1) * block))
            cache_k[b, : rows.stop - rows.start], cache_v[b, : rows.stop - rows.start] = (
                keys[r][rows],
                values[r][rows],
            )
    queries = [torch.randn(n, heads, dim, generator=g) for n in q_lens]
    q = torch.cat(queries + [torch.randn(2, heads, dim, generator=g)]).unsqueeze(1)  # + padding
    cu = torch.tensor([0, 7, 8, 10], dtype=torch.int32)
    got = paged_attention(q, cache_k, cache_v, cu, torch.tensor(kv_lens), table)
    for r in range(3):
        k = keys[r].repeat_interleave(heads // groups, 1)
        v = values[r].repeat_interleave(heads // groups, 1)
        scores = torch.einsum("qhd,khd->hqk", queries[r], k) / dim**0.5
        first = kv_lens[r] - q_lens[r]
        allowed = torch.arange(kv_lens[r])[None] <= torch.arange(first, kv_lens[r])[:, None]
        want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -1e30).softmax(-1), v)
        torch.testing.assert_close(got[cu[r] : cu[r + 1], 0], want, atol=1e-5, rtol=1e-5)
    assert got[10:].abs().max() == 0  # padding rows stay zero


def _stock_for_model(stock):
    def build(cls, model, **kwargs):
        from megatron_cla.inference.context import CONTEXT_TAKES_MODEL_CONFIG

        config = model.config
        if CONTEXT_TAKES_MODEL_CONFIG:
            from megatron.core.inference.config import InferenceConfig

            opts = {k: v for k, v in kwargs.items() if v is not None}
            return stock(config, InferenceConfig(**opts))
        return stock(
            params_dtype=config.params_dtype,
            num_layers=config.num_layers,
            kv_channels=config.kv_channels,
            num_attention_heads=config.num_query_groups,
            **{k: v for k, v in kwargs.items() if v is not None},
        )

    return build


assert set(RUNNERS) >= {"static-context", "dynamic-engine", "static-engine"}
