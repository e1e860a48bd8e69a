"""The ways users plug CLA into a HybridModel: own code (get_cla_hybrid_stack_spec), an unmodified
pretrain_hybrid.py --spec (module-level ModuleSpec objects), Megatron-Bridge spec callables."""

import dataclasses

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, import_module

from megatron_cla import CLAConsumerAttention
from megatron_cla.layer import ENV_PRODUCER_LAYERS, ENV_SHARE_FACTOR
from tests.helpers import TINY_SETTINGS, assert_same_step, loss_and_grads, make_batch
from tests.hybrid_helpers import (
    build_cla_hybrid,
    build_hybrid,
    requires_hybrid,
    tiny_hybrid_config,
    with_stand_in_mixer,
)

pytestmark = requires_hybrid

PATTERN = "*-M*-*-"  # attention layers at pattern layers 1, 4, 6
PLAIN = {
    **{k: v for k, v in TINY_SETTINGS.items() if k != "pipeline_dtype"},
    "num_layers": len(PATTERN),
    "is_hybrid_model": True,  # as Megatron-LM sets it for --hybrid-layer-pattern
}


def _pretrain_hybrid_spec(attr: str) -> ModuleSpec:
    """What Megatron-LM's hybrid_builder does with `--spec megatron_cla.pretrain_hybrid_spec X`."""
    return with_stand_in_mixer(import_module(["megatron_cla.pretrain_hybrid_spec", attr]))


def _roles(model) -> list[bool]:
    return [
        not isinstance(layer.self_attention, CLAConsumerAttention)
        for layer in model.decoder.layers
        if hasattr(layer, "cla_is_producer")
    ]


def test_pretrain_hybrid_spec_is_a_module_spec():
    assert isinstance(import_module(["megatron_cla.pretrain_hybrid_spec", "cla2_te"]), ModuleSpec)


def test_pretrain_hybrid_spec_matches_the_spec_function(single_rank):
    """Plain TransformerConfig + `--spec ... cla3_local` == CLATransformerConfig + spec function."""
    via_spec = build_hybrid(
        TransformerConfig(**PLAIN), _pretrain_hybrid_spec("cla3_local"), PATTERN
    )
    via_function = build_cla_hybrid(tiny_hybrid_config(PATTERN, cla_share_factor=3))
    assert _roles(via_spec) == _roles(via_function) == [True, False, False]
    assert_same_step(
        loss_and_grads(via_spec, make_batch()), loss_and_grads(via_function, make_batch())
    )


def test_pretrain_hybrid_spec_follows_config_flags(single_rank):
    config = TransformerConfig(**{**PLAIN, "qk_layernorm": True, "normalization": "LayerNorm"})
    model = build_hybrid(config, _pretrain_hybrid_spec("cla2_local"), PATTERN)
    names = dict(model.named_parameters())
    assert "decoder.layers.3.self_attention.q_layernorm.weight" in names  # a consumer
    assert "decoder.layers.0.input_layernorm.bias" in names  # LayerNorm, not RMSNorm


def test_pretrain_hybrid_spec_from_environment(single_rank, monkeypatch):
    monkeypatch.setenv(ENV_PRODUCER_LAYERS, "1,3")
    model = build_hybrid(TransformerConfig(**PLAIN), _pretrain_hybrid_spec("cla_local"), PATTERN)
    assert _roles(model) == [True, False, True]
    monkeypatch.delenv(ENV_PRODUCER_LAYERS)
    with pytest.raises(ValueError, match=f"neither {ENV_SHARE_FACTOR}"):
        build_hybrid(TransformerConfig(**PLAIN), _pretrain_hybrid_spec("cla_local"), PATTERN)


@dataclasses.dataclass
class BridgeStyleHybridProvider(TransformerConfig):
    """What a Megatron-Bridge HybridModelProvider subclass with CLA fields looks like."""

    cla_share_factor: int = 2
    hybrid_layer_pattern: str = PATTERN


@pytest.mark.parametrize("call", ["with provider", "without arguments"])
def test_bridge_style_callables(single_rank, call):
    """Bridge calls `hybrid_stack_spec(provider)` or `hybrid_stack_spec()`; the sharing and the
    pattern come from the provider."""
    from megatron_cla.hybrid import cla_hybrid_stack_spec_local

    provider = BridgeStyleHybridProvider(**PLAIN)
    spec = cla_hybrid_stack_spec_local(provider) if call == "with provider" else None
    spec = with_stand_in_mixer(spec or cla_hybrid_stack_spec_local())
    model = build_hybrid(provider, spec, PATTERN)
    assert _roles(model) == [True, False, True]


def test_bridge_style_provider_pattern_counts_for_pipelines(single_rank):
    """A pipelined provider's pattern is the whole model's, so a later stage's roles are right
    (checked through the stage-independent validation)."""
    provider = BridgeStyleHybridProvider(
        **{
            **PLAIN,
            "num_layers": 10,
            "pipeline_model_parallel_size": 2,
            "pipeline_dtype": torch.float32,
        },
        hybrid_layer_pattern="*-M*-|*M*-*",
    )
    from megatron_cla.hybrid.stack import _resolve_layout

    layout = _resolve_layout(None, provider, list("*M*-*"), 5, pp_size=2)
    assert layout.pattern == "*-M*-|*M*-*" and layout.attention_number(8) == 4
