"""The three ways users plug CLA in: own code, pretrain_gpt.py --spec, Bridge/NeMo callables."""

import dataclasses
import inspect

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, import_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_cla import (
    CLAConsumerAttention,
    cla_block_spec_local,
    cla_block_spec_te,
    get_gpt_layer_with_cla_transformer_engine_spec,
)
from megatron_cla._compat import transformer_engine_available
from megatron_cla.layer import ENV_PRODUCER_LAYERS, ENV_SHARE_FACTOR
from tests.helpers import (
    TINY_SETTINGS,
    assert_same_step,
    build_cla_gpt,
    build_gpt,
    loss_and_grads,
    make_batch,
    tiny_config,
)

PLAIN = {k: v for k, v in TINY_SETTINGS.items() if k != "pipeline_dtype"}


def _pretrain_gpt_spec(attr: str):
    """What Megatron-LM's gpt_builder does with `--spec megatron_cla.pretrain_gpt_spec <attr>`."""
    return import_module(["megatron_cla.pretrain_gpt_spec", attr])


def _consumers(model) -> list[int]:
    return [
        layer.layer_number
        for layer in model.decoder.layers
        if isinstance(layer.self_attention, CLAConsumerAttention)
    ]


def test_pretrain_gpt_spec_is_a_module_spec_not_a_function():
    spec = _pretrain_gpt_spec("cla2_local")
    assert isinstance(spec, ModuleSpec)  # used as is: 0.16's pretrain_gpt never calls --spec


def test_pretrain_gpt_callable_spec_builds_the_block_from_the_model_config(single_rank):
    """0.19's GPTModelBuilder calls a callable --spec with its GPTModelConfig (which wraps the
    TransformerConfig as ``.transformer``) and ``vp_stage``; the block spec it returns equals the
    block-spec model."""
    spec_fn = _pretrain_gpt_spec("cla2_block_local")
    assert not isinstance(spec_fn, ModuleSpec) and callable(spec_fn)
    assert "vp_stage" in inspect.signature(spec_fn).parameters

    @dataclasses.dataclass
    class ModelConfig:  # the part of megatron.training's GPTModelConfig the callable reads
        transformer: TransformerConfig

    spec = spec_fn(ModelConfig(TransformerConfig(**PLAIN)), vp_stage=None)
    assert isinstance(spec, TransformerBlockSubmodules) and len(spec.layer_specs) == 6
    via_callable = build_gpt(TransformerConfig(**PLAIN), spec)
    via_block = build_cla_gpt(tiny_config(cla_share_factor=2))
    assert _consumers(via_callable) == _consumers(via_block) == [2, 4, 6]
    assert_same_step(
        loss_and_grads(via_callable, make_batch()), loss_and_grads(via_block, make_batch())
    )


def test_pretrain_gpt_callable_spec_honours_mixed_moe_layers(single_rank, monkeypatch):
    """The block callable knows every layer, so --moe-layer-freq patterns work (the replicated
    layer spec rejects them)."""
    monkeypatch.setenv(ENV_SHARE_FACTOR, "3")
    config = TransformerConfig(
        **{**PLAIN, "num_moe_experts": 2, "moe_layer_freq": [1, 0] * 3, "add_bias_linear": False}
    )
    spec = _pretrain_gpt_spec("cla_block_local")(config, vp_stage=None)
    model = build_gpt(config, spec)
    assert _consumers(model) == [2, 3, 5, 6]
    assert [layer.is_moe_layer for layer in model.decoder.layers] == [True, False] * 3


def test_pretrain_gpt_spec_matches_block_spec_model(single_rank):
    """Plain TransformerConfig + `--spec ... cla2_local` == CLATransformerConfig + block spec."""
    via_spec = build_gpt(TransformerConfig(**PLAIN), _pretrain_gpt_spec("cla2_local"))
    via_block = build_cla_gpt(tiny_config(cla_share_factor=2))
    assert _consumers(via_spec) == _consumers(via_block) == [2, 4, 6]
    batch = make_batch()
    assert_same_step(loss_and_grads(via_spec, batch), loss_and_grads(via_block, batch))


def test_pretrain_gpt_spec_follows_config_flags(single_rank):
    config = TransformerConfig(**{**PLAIN, "qk_layernorm": True, "normalization": "LayerNorm"})
    model = build_gpt(config, _pretrain_gpt_spec("cla3_local"))
    assert _consumers(model) == [2, 3, 5, 6]
    names = dict(model.named_parameters())
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in names
    assert "decoder.layers.0.input_layernorm.bias" in names  # LayerNorm, not RMSNorm


def test_pretrain_gpt_spec_from_environment(single_rank, monkeypatch):
    monkeypatch.setenv(ENV_SHARE_FACTOR, "3")
    assert _consumers(build_gpt(TransformerConfig(**PLAIN), _pretrain_gpt_spec("cla_local"))) == [
        2,
        3,
        5,
        6,
    ]
    monkeypatch.delenv(ENV_SHARE_FACTOR)
    monkeypatch.setenv(ENV_PRODUCER_LAYERS, "1,2,4,6")
    model = build_gpt(TransformerConfig(**PLAIN), _pretrain_gpt_spec("cla_local"))
    assert _consumers(model) == [3, 5]


def test_pretrain_gpt_spec_rejects_mixed_moe_layers(single_rank):
    config = TransformerConfig(**{**PLAIN, "num_moe_experts": 2, "moe_layer_freq": [1, 0] * 3})
    with pytest.raises(ValueError, match="moe-layer-freq"):
        build_gpt(config, _pretrain_gpt_spec("cla2_local"))


def test_te_specs_need_transformer_engine(single_rank):
    if transformer_engine_available():
        spec = get_gpt_layer_with_cla_transformer_engine_spec()
        assert spec.submodules.consumer_self_attention.module is CLAConsumerAttention
        return
    with pytest.raises(ImportError, match="'transformer_engine' is not installed"):
        get_gpt_layer_with_cla_transformer_engine_spec()
    with pytest.raises(ImportError, match="transformer_engine"):
        cla_block_spec_te(tiny_config(cla_share_factor=2))
    with pytest.raises(ImportError, match="transformer_engine"):
        build_gpt(TransformerConfig(**PLAIN), _pretrain_gpt_spec("cla2_te"))


@dataclasses.dataclass
class BridgeStyleProvider(TransformerConfig):
    """What a Megatron-Bridge GPTModelProvider subclass with a CLA field looks like."""

    cla_share_factor: int = 2
    transformer_layer_spec: object = cla_block_spec_local


def _bridge_call(provider, vp_stage=None):
    """Megatron-Bridge's GPTModelProvider.provide(): call with vp_stage when accepted."""
    fn = provider.transformer_layer_spec
    if "vp_stage" in inspect.signature(fn).parameters:
        return fn(provider, vp_stage=vp_stage)
    return fn(provider)


def test_bridge_style_callable(single_rank):
    provider = BridgeStyleProvider(**PLAIN)
    spec = _bridge_call(provider, vp_stage=None)
    assert isinstance(spec, TransformerBlockSubmodules) and len(spec.layer_specs) == 6
    model = build_gpt(provider, spec)
    assert _consumers(model) == [2, 4, 6]
    loss, _ = loss_and_grads(model, make_batch())
    assert torch.isfinite(loss)


def test_bridge_callable_validates_pipeline(single_rank):
    provider = BridgeStyleProvider(
        **PLAIN, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, cla_share_factor=4
    )
    with pytest.raises(ValueError, match="Pipeline stage 1 would start at layer 4"):
        _bridge_call(provider, vp_stage=None)
