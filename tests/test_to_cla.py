"""Converting a trained model to CLA: ``megatron-cla convert to-cla`` and ``import-hf --cla-*``.

State-dict level (no Megatron): S = 1 is the identity; with ``--kv-init mean`` each producer's K
and V rows (and q/k/v bias, k-norm) are the mean over its group's layers, computed here from the
row layout independently; ``first`` keeps the producer's own; consumers keep their query rows;
``--query-groups`` mean-pools K/V heads; sharings that do not merge whole groups are refused.
Run level: the converted run's Megatron logits equal the plain-PyTorch reference built from its
weights (GPT and ``*-`` hybrid, from a run saved at PP 2 too), it trains on, and errors are one
line with nothing written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_cla.conversion.cla_weights import pool_kv_heads, share_kv
from megatron_cla.conversion.qkv_layout import AttentionShape
from megatron_cla.conversion.to_cla import CLATarget, convert_run_to_cla
from megatron_cla.sharing import KVSharing
from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.distributed import init_process_group_once
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import (
    probe_tokens,
    relative_error,
    run_weights,
    variant_config,
    write_random_checkpoint,
)
from tests.hybrid_helpers import requires_hybrid
from tests.pretrain_worker import pretrain_file_on_rank, step_losses
from tests.reference_cla import RefConfig, reference_logits

H, G, D, HIDDEN, LAYERS = 4, 2, 8, 32, 4
SHAPE = AttentionShape(num_heads=H, num_groups=G, head_dim=D, gated_mlp=True)
ROWS = (H + 2 * G) * D


def _params(seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """Random GPT-named weights of an S = 1 model with q/k/v biases and q/k norms."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    params = {"embedding.word_embeddings.weight": r(50, HIDDEN)}
    for i in range(layers):
        a = f"decoder.layers.{i}.self_attention."
        params |= {
            f"decoder.layers.{i}.input_layernorm.weight": r(HIDDEN),
            a + "linear_qkv.weight": r(ROWS, HIDDEN),
            a + "linear_qkv.bias": r(ROWS),
            a + "q_layernorm.weight": r(D),
            a + "k_layernorm.weight": r(D),
            a + "linear_proj.weight": r(HIDDEN, H * D),
            f"decoder.layers.{i}.pre_mlp_layernorm.weight": r(HIDDEN),
            f"decoder.layers.{i}.mlp.linear_fc1.weight": r(64, HIDDEN),
            f"decoder.layers.{i}.mlp.linear_fc2.weight": r(HIDDEN, 32),
        }
    params["decoder.final_layernorm.weight"] = r(HIDDEN)
    return params


def _rows(kind: str, group: int) -> slice:
    """Rows of head ``kind`` (q: all of the group's query heads, k, v) of ``group``."""
    start, per = group * (H // G + 2) * D, H // G * D
    offset, size = {"q": (0, per), "k": (per, D), "v": (per + D, D)}[kind]
    return slice(start + offset, start + offset + size)


def _attn(layer: int, name: str) -> str:
    return f"decoder.layers.{layer - 1}.self_attention.{name}"


@pytest.mark.version_independent
def test_share_factor_one_is_the_identity():
    params = _params()
    out = share_kv(params, SHAPE, KVSharing.uniform(LAYERS, 1))
    assert out.keys() == params.keys()
    assert all(torch.equal(out[k], params[k]) for k in params)


@pytest.mark.version_independent
def test_mean_init_gives_each_producer_its_groups_mean():
    params = _params()
    out = share_kv(params, SHAPE, KVSharing.uniform(LAYERS, 2), "mean")
    for producer, group in ((1, (1, 2)), (3, (3, 4))):
        for kind in ("weight", "bias"):
            fused = out[_attn(producer, f"linear_qkv.{kind}")]
            for g in range(G):
                for head in ("k", "v"):
                    want = sum(
                        params[_attn(n, f"linear_qkv.{kind}")][_rows(head, g)] for n in group
                    )
                    torch.testing.assert_close(fused[_rows(head, g)], want / 2)
                own = params[_attn(producer, f"linear_qkv.{kind}")][_rows("q", g)]
                assert torch.equal(fused[_rows("q", g)], own)
        norms = [params[_attn(n, "k_layernorm.weight")] for n in group]
        torch.testing.assert_close(out[_attn(producer, "k_layernorm.weight")], sum(norms) / 2)
    for consumer in (2, 4):
        for kind in ("weight", "bias"):
            fused = params[_attn(consumer, f"linear_qkv.{kind}")]
            want = torch.cat([fused[_rows("q", g)] for g in range(G)])
            assert torch.equal(out[_attn(consumer, f"linear_q.{kind}")], want)
            assert _attn(consumer, f"linear_qkv.{kind}") not in out
        assert _attn(consumer, "k_layernorm.weight") not in out
        assert torch.equal(
            out[_attn(consumer, "q_layernorm.weight")],
            params[_attn(consumer, "q_layernorm.weight")],
        )
    untouched = [k for k in params if "linear_qkv" not in k and "k_layernorm" not in k]
    assert all(torch.equal(out[k], params[k]) for k in untouched)


@pytest.mark.version_independent
def test_first_init_keeps_the_producers_own_kv():
    params = _params()
    out = share_kv(params, SHAPE, KVSharing.from_producer_layers(LAYERS, [1, 2]), "first")
    for producer in (1, 2):
        assert torch.equal(
            out[_attn(producer, "linear_qkv.weight")], params[_attn(producer, "linear_qkv.weight")]
        )
    assert set(out) - set(params) == {
        _attn(n, f"linear_q.{k}") for n in (3, 4) for k in ("weight", "bias")
    }


@pytest.mark.version_independent
def test_a_cla_model_converts_only_to_a_sharing_that_merges_its_groups():
    cla2 = KVSharing.uniform(LAYERS, 2)
    params = share_kv(_params(), SHAPE, cla2, "mean")
    out = share_kv(params, SHAPE, KVSharing.uniform(LAYERS, 4), "mean", source=cla2)
    for kind in ("weight", "bias"):  # layers 1 and 3 held K/V: the new one is their mean
        fused = out[_attn(1, f"linear_qkv.{kind}")]
        want = (params[_attn(1, f"linear_qkv.{kind}")] + params[_attn(3, f"linear_qkv.{kind}")]) / 2
        torch.testing.assert_close(fused[_rows("k", 1)], want[_rows("k", 1)])
    assert torch.equal(out[_attn(2, "linear_q.weight")], params[_attn(2, "linear_q.weight")])
    with pytest.raises(
        ValueError, match=r"layers \[4\] would produce K/V but have none in this model"
    ):
        share_kv(params, SHAPE, KVSharing.uniform(LAYERS, 3), "mean", source=cla2)


@pytest.mark.version_independent
def test_query_groups_mean_pool_the_kv_heads():
    params = _params(layers=1)
    out, shape = pool_kv_heads(params, SHAPE, 1)
    assert shape == dataclasses.replace(SHAPE, num_groups=1)
    fused, old = out[_attn(1, "linear_qkv.weight")], params[_attn(1, "linear_qkv.weight")]
    assert fused.shape == ((H + 2) * D, HIDDEN)
    queries = torch.cat([old[_rows("q", g)] for g in range(G)])
    assert torch.equal(fused[: H * D], queries)  # the query heads, in order
    for index, head in enumerate(("k", "v")):
        want = (old[_rows(head, 0)] + old[_rows(head, 1)]) / 2
        torch.testing.assert_close(fused[(H + index) * D : (H + index + 1) * D], want)
    with pytest.raises(ValueError, match="--query-groups 3 must divide the model's 2 K/V heads"):
        pool_kv_heads(params, SHAPE, 3)
    with pytest.raises(ValueError, match="--kv-init 'last': use one of"):
        share_kv(params, SHAPE, KVSharing.uniform(1, 1), "last")


# ------------------------------------------------------------------------------- whole runs

VOCAB = 512


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    init_process_group_once()
    return prepared_corpus_sample(tmp_path_factory.mktemp("to_cla_data"), 120, 500)


def _reference_check(run: Path) -> None:
    """The run's Megatron logits equal the plain-PyTorch reference with its weights."""
    from tests.hf_helpers import run_logits

    params, plan = run_weights(run)
    layers = len([k for k in params if k.endswith("input_layernorm.weight")])  # GPT layers
    ref = RefConfig.of(plan.transformer, VOCAB, gated=plan.config.model.swiglu)
    ref = dataclasses.replace(ref, num_layers=layers)
    tokens = probe_tokens(VOCAB)
    want = reference_logits(tokens, params, ref)
    assert relative_error(run_logits(run, tokens), want) < 1e-5


def _source(tmp_path: Path, data_dir: Path, *overrides: str) -> Path:
    cfg = variant_config(tmp_path / "source", data_dir, "model.num_layers=4", *overrides)
    write_random_checkpoint(cfg, VOCAB)
    return tmp_path / "source"


@pytest.mark.parametrize(
    "overrides, target, producers",
    [
        (("model.num_query_groups=2", "model.qk_layernorm=true"), CLATarget(2), (1, 3)),
        (("model.num_query_groups=4",), CLATarget(None, (1, 2), "first", 1), (1, 2)),
    ],
    ids=["gqa-qknorm-cla2-mean", "mha-to-mqa-keepfirst-first"],
)
def test_converted_run_equals_the_reference_with_its_weights(
    data_dir, tmp_path, overrides, target, producers
):
    source = _source(tmp_path, data_dir, *overrides)
    path, cfg = convert_run_to_cla(source, tmp_path / "cla", target)
    assert path == tmp_path / "cla" / "checkpoints" / "iter_0000000"
    _reference_check(tmp_path / "cla")
    converted, plan = run_weights(tmp_path / "cla")
    assert plan.transformer.cla_sharing.producer_layers == producers
    assert plan.config.model.num_query_groups == (target.query_groups or cfg.model.num_query_groups)
    original, source_plan = run_weights(source)
    from megatron_cla.conversion.to_cla import convert_parameters

    want = convert_parameters(
        original,
        source_plan.config.model,
        source_plan.transformer.cla_sharing,
        plan.transformer.cla_sharing,
        target.kv_init,
        target.query_groups,
    )
    assert want.keys() == converted.keys()
    assert all(torch.equal(want[k], converted[k]) for k in want)


@requires_hybrid
def test_a_hybrid_run_converts(data_dir, tmp_path):
    source = _source(
        tmp_path,
        data_dir,
        "model.arch=hybrid",
        "model.hybrid_layer_pattern=*-*-*-*-",
        "model.num_layers=null",
    )
    convert_run_to_cla(source, tmp_path / "cla", CLATarget(2))
    _reference_check(tmp_path / "cla")


def test_the_command_converts_and_the_run_trains_on(data_dir, tmp_path):
    source = _source(tmp_path, data_dir, "model.num_query_groups=2")
    out = tmp_path / "cla"
    proc = run_command(
        "convert", "to-cla", "--checkpoint", source, "--out", out, "--cla-share-factor", 2
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {out}/checkpoints/iter_0000000: ")
    assert "CLA groups [1 2] [3 4], K/V init mean" in proc.stdout.splitlines()[0]
    overrides = ["train.train_iters=2", "train.warmup_iters=0", "logging.log_interval=1"]
    overrides += ["logging.progress_bar=false", "logging.tensorboard=false"]
    run_on_ranks(pretrain_file_on_rank, 1, str(out / "config.yaml"), overrides, timeout=600)
    losses = step_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())


def test_a_run_saved_at_pp2_converts_and_bad_targets_are_one_line(pp2_gpt_run, tmp_path):
    """The PP 2 CLA2 run, re-grouped as it is, gives its own logits; S = 4 would start the second
    pipeline stage on a consumer, S = 3 would need K/V from layer 4, which has none."""
    from tests.hf_helpers import run_logits

    init_process_group_once()
    same = tmp_path / "same"
    convert_run_to_cla(pp2_gpt_run, same, CLATarget(None, (1, 3)))
    tokens = probe_tokens(VOCAB)
    assert torch.equal(run_logits(same, tokens), run_logits(pp2_gpt_run, tokens))
    for factor, message in (
        (4, "convert: Pipeline stage 1 would start at layer 3, a CLA consumer of layer 1"),
        (3, "convert: layers [4] would produce K/V but have none in this model"),
    ):
        proc = run_command(
            "convert",
            "to-cla",
            "--checkpoint",
            pp2_gpt_run,
            "--out",
            tmp_path / "bad",
            "--cla-share-factor",
            factor,
        )
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert proc.stderr.startswith(message), proc.stderr
    proc = run_command("convert", "to-cla", "--checkpoint", pp2_gpt_run, "--out", tmp_path / "bad")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip() == "convert: to-cla needs --cla-share-factor S or --cla-producer-layers"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]
