"""Every parallel layout reproduces the single-rank run: loss, gradients, optimizer step.

Each case spawns its ranks (gloo on CPU, NCCL on GPU) and trains two steps through Megatron's own
schedules, DDP and optimizer (see ``tests/parallel_worker.py``); the single-rank run of the same
model, with the same key-seeded weights and data, is the reference.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.sharding import assemble
from tests.hybrid_helpers import requires_hybrid
from tests.parallel_worker import train_two_steps

pytestmark = pytest.mark.distributed

MQA_S2 = dict(cla_share_factor=2, num_query_groups=1)
GQA_S2 = dict(cla_share_factor=2, num_query_groups=2)
PATTERN = dict(cla_producer_layers=[1, 2, 3, 5, 7], num_query_groups=1)

# Hybrid stacks: attention layers split by MLP and (stand-in) Mamba slots; '|' marks the pipeline
# segments (removed for the single-rank reference, whose checkpoint keys are the same).
HYBRID = dict(hybrid_layer_pattern="*-M*-|*M*-*-", cla_share_factor=2, num_query_groups=1)
HYBRID_GQA = dict(hybrid_layer_pattern="*-M*-|*M*-*-", cla_share_factor=2, num_query_groups=2)
HYBRID_VPP = dict(hybrid_layer_pattern="*-M*-|*M*-|*-*-|M*-*-", cla_share_factor=2)

# id: (layout, world size, model)
LAYOUTS = {
    "TP2-MQA (groups < TP)": (dict(tp=2), 2, MQA_S2),
    "TP2-GQA": (dict(tp=2), 2, GQA_S2),
    "TP2-SP": (dict(tp=2, sp=True), 2, MQA_S2),
    "PP2": (dict(pp=2), 2, MQA_S2),
    "PP2-pattern": (dict(pp=2), 2, PATTERN),
    "PP2xVPP2": (dict(pp=2, vp=2), 2, GQA_S2),
    "TP2xPP2": (dict(tp=2, pp=2), 4, MQA_S2),
    "DP2": (dict(), 2, GQA_S2),
    "hybrid TP2-MQA": (dict(tp=2), 2, HYBRID),
    "hybrid TP2-SP": (dict(tp=2, sp=True), 2, HYBRID),
    "hybrid PP2": (dict(pp=2), 2, HYBRID_GQA),
    "hybrid PP2xVPP2": (dict(pp=2, vp=2), 2, HYBRID_VPP),
    "hybrid TP2xPP2": (dict(tp=2, pp=2), 4, HYBRID),
    "hybrid DP2": (dict(), 2, HYBRID_GQA),
}
_HYBRID_IDS = [name for name in LAYOUTS if name.startswith("hybrid")]


@functools.cache
def _single_rank(model_key: tuple) -> dict:
    return run_on_ranks(train_two_steps, 1, {}, dict(model_key))[0]


def _last_stage_losses(reports: list[dict]) -> list[list[float]]:
    """Mean loss per step over the ranks that computed it (last stage; all DP ranks)."""
    per_step = [[], []]
    for report in reports:
        for step, values in enumerate(report["losses"]):
            per_step[step].extend(values)
    return per_step


def _close(got: dict, want: dict, atol: float) -> None:
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    bad = []
    for key, w in want.items():
        diff = (got[key] - w).abs().max().item()
        if diff > atol * max(1.0, w.abs().max().item()):
            bad.append(f"{key}: {diff:.3e}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=requires_hybrid) if n in _HYBRID_IDS else n for n in LAYOUTS],
)
def test_layout_matches_single_rank(name):
    layout, world, model = LAYOUTS[name]
    reference = _single_rank(
        tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in model.items()))
    )
    reports = run_on_ranks(train_two_steps, world, layout, model)

    ref_losses = _last_stage_losses([reference])
    losses = _last_stage_losses(reports)
    for step in range(2):
        # every rank that reports a loss sees the same microbatches as the reference (or, for DP,
        # a disjoint share of them): compare the averages
        want = torch.tensor(ref_losses[step]).mean()
        got = torch.tensor(losses[step]).mean()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"step {step + 1}")

    _close(assemble(r["grads"] for r in reports), assemble([reference["grads"]]), atol=1e-6)
    _close(assemble(r["params"] for r in reports), assemble([reference["params"]]), atol=1e-5)
