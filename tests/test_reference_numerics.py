"""The Megatron CLA model against the independent plain-PyTorch reference: logits and gradients."""

import pytest
import torch

from tests.helpers import VOCAB, build_cla_gpt, loss_and_grads, make_batch, tiny_config
from tests.reference_cla import RefConfig, reference_loss

SHARINGS = {
    "S1": dict(cla_share_factor=1),
    "S2": dict(cla_share_factor=2),
    "S3": dict(cla_share_factor=3),
    "keep_ends": dict(cla_producer_layers=[1, 2, 4, 6]),
}
HEADS = {"MQA": 1, "GQA": 2, "MHA": 4}


def _compare(config, gated=False):
    model = build_cla_gpt(config)
    batch = make_batch()
    loss, grads = loss_and_grads(model, batch)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref_loss, ref_logits = reference_loss(
        batch["tokens"], batch["labels"], params, RefConfig.of(config, VOCAB, gated)
    )
    ref_loss.backward()
    with torch.no_grad():
        model.eval()
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sharing", SHARINGS)
def test_matches_reference(single_rank, sharing, heads):
    config = tiny_config(num_query_groups=HEADS[heads], **SHARINGS[sharing])
    _compare(config)


def test_matches_reference_swiglu_layernorm_qk_norm(single_rank):
    """Gated MLP, LayerNorm with bias and per-head Q/K norms, GQA, CLA2."""
    config = tiny_config(
        num_query_groups=2,
        cla_share_factor=2,
        normalization="LayerNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        qk_layernorm=True,
    )
    _compare(config, gated=True)
