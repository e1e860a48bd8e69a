"""CLA in HybridModel: equal to the verified GPT CLA, to Megatron's stock stack at S = 1, and to
the independent plain-PyTorch reference through Mamba-slot (CPU stand-in) layers."""

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_cla import CLAConsumerAttention
from tests.helpers import (
    VOCAB,
    assert_grads_equal,
    assert_same_model_step,
    build_cla_gpt,
    loss_and_grads,
    make_batch,
    tiny_config,
)
from tests.hybrid_helpers import (
    STAND_IN_MAMBA,
    build_cla_hybrid,
    build_hybrid,
    requires_hybrid,
    tiny_hybrid_config,
)
from tests.reference_cla import RefConfig, reference_hybrid_logits

pytestmark = requires_hybrid

SHARINGS = {
    "S1": dict(cla_share_factor=1),
    "S2": dict(cla_share_factor=2),
    "S3": dict(cla_share_factor=3),
    "keep_ends": dict(cla_producer_layers=[1, 2, 4, 6]),
}
HEADS = {"MQA": 1, "GQA": 2}
MIXED = "*-M*-*M*-*-M*-"
"""Six attention layers with MLP and (stand-in) Mamba slots between producers and consumers."""


def _copy_gpt_weights(gpt, hybrid) -> dict[str, str]:
    """Give ``hybrid`` (a ``*-`` stack) the weights of ``gpt``; returns hybrid -> GPT names."""
    from megatron_cla.hybrid.keys import hybrid_key_for_gpt_key

    gpt_params, hybrid_params = dict(gpt.named_parameters()), dict(hybrid.named_parameters())
    names = {hybrid_key_for_gpt_key(n): n for n in gpt_params}
    assert sorted(names) == sorted(hybrid_params)
    with torch.no_grad():
        for h, g in names.items():
            hybrid_params[h].copy_(gpt_params[g])
    return names


def _logits(model, batch):
    with torch.no_grad():
        model.eval()
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        model.train()
    return out


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sharing", SHARINGS)
def test_star_dash_stack_equals_gpt_cla(single_rank, sharing, heads):
    """`*-` x 6 with the GPT model's weights: the same logits, loss and every gradient."""
    groups = HEADS[heads]
    gpt = build_cla_gpt(tiny_config(num_query_groups=groups, **SHARINGS[sharing]))
    hybrid = build_cla_hybrid(
        tiny_hybrid_config("*-" * 6, num_query_groups=groups, **SHARINGS[sharing])
    )
    names = _copy_gpt_weights(gpt, hybrid)
    consumers = [i for i, layer in enumerate(hybrid.decoder.layers) if _is_consumer(layer)]
    assert consumers == [2 * (n - 1) for n in gpt.config.cla_sharing.consumer_layers]
    batch = make_batch()
    assert torch.equal(_logits(hybrid, batch), _logits(gpt, batch))
    loss_g, grads_g = loss_and_grads(gpt, batch)
    loss_h, grads_h = loss_and_grads(hybrid, batch)
    assert loss_h.item() == loss_g.item()
    assert_grads_equal({names[k]: v for k, v in grads_h.items()}, grads_g)


def _is_consumer(layer) -> bool:
    return isinstance(getattr(layer, "self_attention", None), CLAConsumerAttention)


def _stock_spec():
    """Megatron's own HybridStack over plain local layers (no CLA), with the stand-in mixer."""
    # Imported here: megatron-core 0.16.1 (no HybridModel) lacks these, and the module skips there.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer

    gpt = get_gpt_layer_local_submodules(normalization="RMSNorm")
    attention = TransformerLayerSubmodules(
        input_layernorm=gpt.input_layernorm,
        self_attention=gpt.self_attention,
        self_attn_bda=gpt.self_attn_bda,
    )
    mlp = TransformerLayerSubmodules(
        pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp, mlp_bda=gpt.mlp_bda
    )
    submodules = HybridStackSubmodules(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp),
        mamba_layer=STAND_IN_MAMBA,
    )
    return ModuleSpec(module=HybridStack, submodules=submodules), gpt.input_layernorm


RECOMPUTE = {
    "none": {},
    "full uniform 2": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2
    ),
    "full block 3": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=3
    ),
}


@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("pattern", ["*-*-*-", "*M*-M*-"])
def test_s1_is_bitwise_megatron_stock_stack(single_rank, monkeypatch, pattern, recompute):
    from megatron.core.models.hybrid import hybrid_block

    stock_spec, norm = _stock_spec()
    # Megatron's stack builds its final norm with Transformer Engine, which a CPU lacks; the CLA
    # stack's local spec uses Megatron's torch norm there, so the stock one gets the same norm.
    monkeypatch.setattr(hybrid_block, "TENorm", norm)
    config = tiny_hybrid_config(pattern, num_query_groups=2, **RECOMPUTE[recompute])
    stock = build_hybrid(config, stock_spec, pattern)
    cla = build_cla_hybrid(config)
    assert_same_model_step(cla, stock, make_batch(seed=3))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sharing", SHARINGS)
def test_mixed_pattern_matches_reference(single_rank, sharing, heads):
    """Producers hand K/V across MLP and Mamba-slot layers: logits and every gradient match the
    plain-PyTorch reference (which counts producers over the attention layers)."""
    config = tiny_hybrid_config(MIXED, num_query_groups=HEADS[heads], **SHARINGS[sharing])
    model = build_cla_hybrid(config)
    batch = make_batch()
    loss, grads = loss_and_grads(model, batch)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref_logits = reference_hybrid_logits(
        batch["tokens"], params, RefConfig.of(config, VOCAB), MIXED
    )
    ref_loss = torch.nn.functional.cross_entropy(
        ref_logits.reshape(-1, VOCAB), batch["labels"].reshape(-1)
    )
    ref_loss.backward()
    torch.testing.assert_close(_logits(model, batch), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_numbering_counts_star_slots_only(single_rank):
    """S = 2 on `*-*-*-*-`: attention layers 2 and 4 (pattern layers 3 and 7) consume; with
    Megatron's layer numbers every attention layer would have been a producer."""
    model = build_cla_hybrid(tiny_hybrid_config("*-*-*-*-", cla_share_factor=2))
    roles = {
        layer.layer_number: layer.cla_is_producer
        for layer in model.decoder.layers
        if hasattr(layer, "cla_is_producer")
    }
    assert roles == {1: True, 3: False, 5: True, 7: False}
    consumers = [layer for layer in model.decoder.layers if _is_consumer(layer)]
    assert [c.self_attention.cla_producer_layer_number for c in consumers] == [1, 5]
    names = dict(model.named_parameters())
    assert "decoder.layers.2.self_attention.linear_q.weight" in names
    assert "decoder.layers.2.self_attention.linear_qkv.weight" not in names


def test_moe_hybrid_equals_gpt_with_mixed_moe_layers(single_rank):
    """`*E*-*E*-` = a GPT CLA2 model whose layers 1 and 3 are MoE: the hand-off crosses MoE
    layers unchanged (same weights: same logits and gradients, bit for bit)."""
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, add_bias_linear=False)
    gpt_config = tiny_config(num_layers=4, cla_share_factor=2, moe_layer_freq=[1, 0, 1, 0], **moe)
    gpt = build_cla_gpt(gpt_config)
    hybrid = build_cla_hybrid(tiny_hybrid_config("*E*-*E*-", cla_share_factor=2, **moe))
    names = _copy_gpt_weights(gpt, hybrid)
    batch = make_batch(seed=4)
    assert torch.equal(_logits(hybrid, batch), _logits(gpt, batch))
    loss_g, grads_g = loss_and_grads(gpt, batch)
    loss_h, grads_h = loss_and_grads(hybrid, batch)
    assert loss_h.item() == loss_g.item()
    assert_grads_equal({names[k]: v for k, v in grads_h.items()}, grads_g)
