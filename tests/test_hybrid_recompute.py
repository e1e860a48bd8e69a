"""Activation recomputation in a CLA hybrid stack changes neither the loss nor any gradient.

The pattern puts MLP and (stand-in) Mamba slots between producers and consumers, so checkpoint
chunks split groups, start on MLP or Mamba slots, and carry the hand-off across them; Megatron's
own hybrid recompute would reset it after every Mamba slot.
"""

import pytest
import torch

from tests.helpers import (
    assert_grads_equal,
    assert_same_step,
    detach_the_handoff,
    loss_and_grads,
    make_batch,
)
from tests.hybrid_helpers import build_cla_hybrid, requires_hybrid, tiny_hybrid_config
from tests.test_recompute import SELECTIVE, SHARINGS

pytestmark = requires_hybrid

PATTERN = "*-M*-*M*-*-M*-"  # 14 layers, attention layers at 1 4 6 8 10 13
FULL = [
    ("uniform", 1),
    ("uniform", 2),  # chunks start on M (layer 3) and '-' slots
    ("uniform", 3),
    ("uniform", 5),
    ("block", 1),
    ("block", 4),
    ("block", 14),
]
# SELECTIVE, SHARINGS: the GPT suite's (6 attention layers there and here)


def _run(sharing, recompute, **extra):
    config = tiny_hybrid_config(
        PATTERN, num_query_groups=2, **SHARINGS[sharing], **recompute, **extra
    )
    return loss_and_grads(build_cla_hybrid(config), make_batch(seed=5))


@pytest.mark.parametrize("method,chunk", FULL)
@pytest.mark.parametrize("sharing", SHARINGS)
def test_full_recompute_is_bitwise(single_rank, sharing, method, chunk):
    full = dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=chunk)
    assert_same_step(_run(sharing, full), _run(sharing, {}))


@pytest.mark.parametrize("modules", SELECTIVE)
def test_selective_recompute_is_bitwise(single_rank, modules):
    extra = dict(add_bias_linear=False)  # Megatron's local MLP recompute needs unbiased linears
    selective = dict(recompute_granularity="selective", recompute_modules=modules)
    assert_same_step(_run("S2", selective, **extra), _run("S2", {}, **extra))


def test_full_recompute_with_dropout_replays_masks(single_rank):
    extra = dict(hidden_dropout=0.1, attention_dropout=0.1)
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3)
    assert_same_step(_run("S3", full, **extra), _run("S3", {}, **extra))


def test_eval_forward_equals_training_forward(single_rank):
    """Eval (no autograd, no recompute) runs the same hand-off."""
    model = build_cla_hybrid(tiny_hybrid_config(PATTERN, cla_share_factor=3))
    batch = make_batch(seed=2)
    args = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    train_logits = model(*args)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*args), train_logits.detach())


def test_comparison_detects_a_lost_gradient(single_rank, monkeypatch):
    """The bitwise check has teeth here too: a hand-off that drops the consumer -> producer
    gradient across the MLP/Mamba slots must be caught."""
    base_loss, base = _run("S2", {})
    detach_the_handoff(monkeypatch)
    loss, grads = _run("S2", {})
    assert loss.item() == base_loss.item()
    with pytest.raises(AssertionError, match="linear_qkv"):
        assert_grads_equal(grads, base)
