"""Distributed checkpoints: save at TP2xPP2, load at TP1xPP1 and TP1xPP2, identical logits."""

from __future__ import annotations

import pytest
import torch

from megatron_cla.testing import run_on_ranks
from tests import checkpoint_worker as ckpt
from tests.hybrid_helpers import requires_hybrid

pytestmark = pytest.mark.distributed


def _last_stage(results: list) -> torch.Tensor:
    found = [r for r in results if r is not None]
    assert found, "no rank returned logits"
    for other in found[1:]:
        assert torch.equal(other, found[0])  # TP ranks of the last stage agree
    return found[0]


@pytest.fixture(scope="module")
def tp2pp2_checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cla_ckpt_tp2pp2"))
    logits = _last_stage(run_on_ranks(ckpt.save, 4, 2, 2, directory))
    return directory, logits


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 2)])
def test_resharded_load_reproduces_logits(tp2pp2_checkpoint, tp, pp):
    directory, saved = tp2pp2_checkpoint
    loaded = _last_stage(run_on_ranks(ckpt.load, tp * pp, tp, pp, directory))
    # Different TP sizes sum partial products in a different order: fp32 rounding only.
    torch.testing.assert_close(loaded, saved, rtol=1e-5, atol=1e-5)


def test_load_is_exact_at_same_tensor_parallel_size(tp2pp2_checkpoint, tmp_path):
    directory, _ = tp2pp2_checkpoint
    tp1pp1 = _last_stage(run_on_ranks(ckpt.load, 1, 1, 1, directory))
    tp1pp2 = _last_stage(run_on_ranks(ckpt.load, 2, 1, 2, directory))
    assert torch.equal(tp1pp1, tp1pp2)


def test_checkpoint_keys_are_per_layer_and_role(tp2pp2_checkpoint):
    directory, _ = tp2pp2_checkpoint
    keys = run_on_ranks(ckpt.checkpoint_keys, 1, directory)[0]
    attn = [k for k in keys if k.endswith((".linear_qkv.weight", ".linear_q.weight"))]
    assert attn == [
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.1.self_attention.linear_q.weight",
        "decoder.layers.2.self_attention.linear_qkv.weight",
        "decoder.layers.3.self_attention.linear_q.weight",
        "decoder.layers.4.self_attention.linear_qkv.weight",
        "decoder.layers.5.self_attention.linear_q.weight",
        "decoder.layers.6.self_attention.linear_qkv.weight",
        "decoder.layers.7.self_attention.linear_q.weight",
    ]
    assert "decoder.layers.1.self_attention.linear_q.layer_norm_weight" in keys


@pytest.fixture(scope="module")
def hybrid_tp2pp2_checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cla_hybrid_ckpt_tp2pp2"))
    logits = _last_stage(run_on_ranks(ckpt.save, 4, 2, 2, directory, "hybrid"))
    return directory, logits


@requires_hybrid
def test_hybrid_tp2pp2_save_loads_at_tp1pp1(hybrid_tp2pp2_checkpoint):
    """A `*-M*-|*M*-*-` CLA2 HybridModel saved at TP2 x PP2 reloads as one `*-M*-*M*-*-` stage."""
    directory, saved = hybrid_tp2pp2_checkpoint
    tp1pp1 = _last_stage(run_on_ranks(ckpt.load, 1, 1, 1, directory, "hybrid"))
    torch.testing.assert_close(tp1pp1, saved, rtol=1e-5, atol=1e-5)
    keys = run_on_ranks(ckpt.checkpoint_keys, 1, directory)[0]
    assert "decoder.layers.3.self_attention.linear_q.weight" in keys  # attention layer 2
    assert "decoder.layers.5.self_attention.linear_qkv.weight" in keys  # attention layer 3
    assert "decoder.layers.2.gate_proj.weight" in keys  # the Mamba slot (stand-in)
