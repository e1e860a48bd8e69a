"""Invalid hybrid CLA settings raise at build time, naming the values and a fix; valid hybrid
settings that GPT numbering would have misjudged pass."""

import re

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_cla._compat import transformer_engine_available
from tests.helpers import TINY_SETTINGS
from tests.hybrid_helpers import (
    build_hybrid,
    cla_hybrid_spec,
    pattern_length,
    requires_hybrid,
    tiny_hybrid_config,
)

pytestmark = requires_hybrid

PP2 = dict(pipeline_model_parallel_size=2)

# (id, pattern, config overrides, expected message regex)
INVALID_HYBRID = [
    ("no attention", "M-M-", {}, r"has no attention layer \('\*'\)"),
    ("MTP", "*-*-/*-", {}, r"multi-token-prediction layers.*drop the '/...' part"),
    ("DSA", "D-D-", {}, r"\['D'\] layers.*use standard attention '\*'"),
    ("MLA", "+-+-", {}, r"\['\+'\] layers"),
    ("unknown symbol", "*-X-", {}, r"unknown symbols \['X'\]"),
    (
        "S > attention layers",
        "*-*-M-",
        dict(cla_share_factor=3),
        r"cla_share_factor=3 exceeds the 2 attention layers \('\*'\) of "
        r"hybrid_layer_pattern='\*-\*-M-'",
    ),
    (
        "producer out of range",
        "*-*-M-",
        dict(cla_producer_layers=[1, 3]),
        r"names layer 3, but the 2 attention layers",
    ),
    (
        "num_layers mismatch",
        "*-*-",
        dict(num_layers=6, cla_share_factor=2),
        r"num_layers=6 but hybrid_layer_pattern='\*-\*-' has 4 layers: set num_layers=4",
    ),
    (
        "segment starts on consumer",
        "*-*-*-|*-*-*-",
        dict(cla_share_factor=2, **PP2),
        r"Pipeline segment 1 \(pipeline rank 1\).*starts with attention "
        r"layer 4 \(pattern layer 7\), a CLA consumer of attention layer 3.*"
        r"A pattern that works: hybrid_layer_pattern='\*-\*-\*-\*\|-\*-\*-'",
    ),
    (
        "segment after Mamba slot",
        "*M*-|M*-*-",
        dict(cla_share_factor=3, **PP2),
        r"segment 1 .* starts with attention layer 3 \(pattern layer 6\), a CLA consumer of "
        r"attention layer 1",
    ),
    (
        "even split without |",
        "*-" * 6,
        dict(cla_share_factor=2, **PP2),
        r"segment 1 \(pipeline rank 1\).*starts with attention layer 4",
    ),
    (
        "VPP chunk",
        "*-*-|*-*-|*-*-*-|*-",
        dict(cla_share_factor=2, virtual_pipeline_model_parallel_size=2, **PP2),
        r"segment 3 \(pipeline rank 1, virtual chunk 1\)",
    ),
    (
        "segments != stages",
        "*-|*-|*-",
        dict(cla_share_factor=2, **PP2),
        r"has 3 pipeline segments but pipeline_model_parallel_size=2 x virtual chunks=1 needs 2",
    ),
    (
        "VPP without |",
        "*-" * 4,
        dict(cla_share_factor=2, virtual_pipeline_model_parallel_size=2, **PP2),
        r"virtual pipelining .* needs hybrid_layer_pattern='(\*-){4}' to mark its 4 segments",
    ),
    (
        "no_rope inside a group",
        "*-*-",
        dict(cla_share_factor=2, no_rope_freq=[0, 0, 1, 0]),
        r"consumer layer 2 no RoPE but its producer layer 1 RoPE",
    ),
    (
        "MLA flag",
        "*-*-",
        dict(cla_share_factor=2, multi_latent_attention=True),
        r"multi_latent_attention=True cannot be combined",
    ),
]


@pytest.mark.parametrize(
    "pattern,overrides,message",
    [c[1:] for c in INVALID_HYBRID],
    ids=[c[0] for c in INVALID_HYBRID],
)
def test_invalid_hybrid_config_raises(pattern, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_hybrid_config(pattern, **{"num_layers": pattern_length(pattern), **overrides})


@pytest.mark.parametrize(
    "pattern,overrides",
    [
        # GPT numbering (10 layers, S = 2, even split at 5) would call pattern layer 6 a consumer
        ("*-M*-|*-*-", dict(cla_share_factor=2, **PP2)),
        # a segment may end on an attention layer and start on MLP or Mamba slots
        ("*-*-*-*|-*-*-", dict(cla_share_factor=2, **PP2)),
        (
            "*-*-|M*-*-|*-*-|M*-*-",
            dict(cla_share_factor=2, virtual_pipeline_model_parallel_size=2, **PP2),
        ),
        # S counts the 3 attention layers, not the 6 pattern layers
        ("*-*-*-", dict(cla_share_factor=3)),
        ("*-*-*-", dict(cla_producer_layers=[1, 3])),
        # no_rope_freq is indexed by pattern layer: layers 2 and 4 are MLPs
        ("*-*-", dict(cla_share_factor=2, no_rope_freq=[0, 1, 0, 1])),
    ],
)
def test_valid_hybrid_settings_pass(pattern, overrides):
    tiny_hybrid_config(pattern, **overrides)


@pytest.mark.parametrize(
    "pattern,overrides",
    [
        ("*-*-*-|*-*-*-", dict(cla_share_factor=2, **PP2)),
        ("*M*-|M*-*-", dict(cla_share_factor=3, **PP2)),
        ("*-" * 6, dict(cla_share_factor=2, **PP2)),
        ("*-*-*M*-*-*-*-*-", dict(cla_producer_layers=[1, 2, 4, 6, 8], **PP2)),
    ],
)
def test_suggested_pattern_is_accepted(pattern, overrides):
    with pytest.raises(ValueError) as err:
        tiny_hybrid_config(pattern, **overrides)
    suggestion = re.search(r"hybrid_layer_pattern='([^']+)'\.$", str(err.value)).group(1)
    assert suggestion.replace("|", "") == pattern.replace("|", "")
    tiny_hybrid_config(suggestion, **overrides)


PLAIN = {k: v for k, v in TINY_SETTINGS.items() if k != "pipeline_dtype"}


def _plain(pattern: str, **overrides):
    return TransformerConfig(**{**PLAIN, "num_layers": pattern_length(pattern), **overrides})


def test_stack_counts_attention_layers_with_a_plain_config(single_rank):
    """Spec-carried S with Megatron's plain TransformerConfig (as pretrain_hybrid.py builds)."""
    model = build_hybrid(_plain("*-M*-*-"), cla_hybrid_spec(cla_share_factor=3), "*-M*-*-")
    roles = [
        layer.cla_is_producer for layer in model.decoder.layers if hasattr(layer, "cla_is_producer")
    ]
    assert roles == [True, False, False]


def test_stack_rejects_s_beyond_attention_layers(single_rank):
    with pytest.raises(ValueError, match=r"cla_share_factor=4 exceeds the 3 attention layers"):
        build_hybrid(_plain("*-*-*-"), cla_hybrid_spec(cla_share_factor=4), "*-*-*-")


def test_stack_rejects_a_missing_slot(single_rank):
    from megatron_cla.hybrid import get_cla_hybrid_stack_spec

    spec = get_cla_hybrid_stack_spec(use_transformer_engine=False, cla_share_factor=2)
    spec.submodules.gdn_layer = None
    with pytest.raises(ValueError, match=r"'G' layers but the hybrid stack spec's gdn_layer"):
        build_hybrid(_plain("*G*-"), _with_identity_gdn(spec), "*G*-")


def _with_identity_gdn(spec):
    import dataclasses

    from megatron.core.transformer.identity_op import IdentityOp

    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, gdn_layer=IdentityOp)
    )


@pytest.mark.skipif(transformer_engine_available(), reason="TE is installed: Mamba-2 is buildable")
def test_local_spec_without_te_refuses_mamba_slots(single_rank):
    from megatron_cla.hybrid import get_cla_hybrid_stack_spec

    spec = get_cla_hybrid_stack_spec(use_transformer_engine=False, cla_share_factor=2)
    with pytest.raises(ImportError, match=r"'M' \(Mamba-2\) layers.*Transformer Engine"):
        build_hybrid(_plain("*M*-"), spec, "*M*-")


def test_stack_and_model_must_agree_on_the_pattern(single_rank):
    spec = cla_hybrid_spec(cla_share_factor=2, hybrid_layer_pattern="*-*-*-")
    with pytest.raises(ValueError, match=r"builds layers '\*M\*-' at offset 0, but the CLA"):
        build_hybrid(_plain("*M*-"), spec, "*M*-")


def test_pipelined_stack_needs_the_whole_pattern(single_rank):
    from megatron_cla.hybrid.stack import _resolve_layout

    config = _plain("*-*-", pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"does not know the whole hybrid_layer_pattern"):
        _resolve_layout(None, config, list("*-"), 0, pp_size=2)


def test_mtp_layers_are_refused(single_rank):
    """Megatron builds MTP depths with its own HybridStack: a CLA layer there must not guess."""
    spec = cla_hybrid_spec(cla_share_factor=1)
    attention = spec.submodules.attention_layer
    with pytest.raises(ValueError, match=r"must be built by megatron_cla's CLAHybridStack"):
        from megatron.core.transformer.spec_utils import build_module

        build_module(attention, config=_plain("*-"), layer_number=1, is_mtp_layer=True)


def test_stock_attention_spec_is_refused(single_rank):
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    spec = cla_hybrid_spec(cla_share_factor=2)
    stock = ModuleSpec(
        module=TransformerLayer, submodules=spec.submodules.attention_layer.submodules
    )
    spec = dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, attention_layer=stock)
    )
    with pytest.raises(ValueError, match=r"needs a CLATransformerLayer attention_layer spec"):
        build_hybrid(_plain("*-*-"), spec, "*-*-")
