"""Every invalid CLA setting raises ValueError at build time, naming the bad values and the fix."""

import re

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_cla import (
    CLATransformerConfig,
    cla_layer_spec_from_stock,
    get_cla_decoder_block_spec,
    get_gpt_layer_with_cla_local_spec,
)
from megatron_cla.layer import ENV_SHARE_FACTOR
from tests.helpers import build_gpt, tiny_config

PP = dict(pipeline_model_parallel_size=2)

# (id, config overrides, expected message regex)
INVALID_CONFIGS = [
    ("S=0", dict(cla_share_factor=0), r"cla_share_factor must be >= 1, got 0"),
    ("S<0", dict(cla_share_factor=-2), r"cla_share_factor must be >= 1, got -2"),
    ("S float", dict(cla_share_factor=2.0), r"cla_share_factor must be an int, got 2\.0"),
    ("S bool", dict(cla_share_factor=True), r"cla_share_factor must be an int, got True"),
    ("S>layers", dict(cla_share_factor=7), r"cla_share_factor=7 exceeds num_layers=6"),
    ("producers no 1", dict(cla_producer_layers=[2, 4]), r"must start with layer 1"),
    ("producers empty", dict(cla_producer_layers=[]), r"must start with layer 1"),
    ("producers unsorted", dict(cla_producer_layers=[1, 4, 3]), r"strictly increasing"),
    ("producers dup", dict(cla_producer_layers=[1, 3, 3]), r"strictly increasing"),
    ("producers range", dict(cla_producer_layers=[1, 7]), r"names layer 7.*num_layers=6"),
    ("producers type", dict(cla_producer_layers=[1, "3"]), r"must contain ints, got \['3'\]"),
    ("producers not list", dict(cla_producer_layers=3), r"must be a list of 1-based"),
    (
        "S and producers",
        dict(cla_share_factor=2, cla_producer_layers=[1, 3]),
        r"either cla_share_factor=2 or cla_producer_layers=\[1, 3\], not both",
    ),
    (
        "MLA",
        dict(cla_share_factor=2, multi_latent_attention=True),
        r"multi_latent_attention=True cannot be combined.*set multi_latent_attention=False",
    ),
    (
        "fused qkv rope",
        dict(cla_share_factor=2, fused_single_qkv_rope=True),
        r"fused_single_qkv_rope=True cannot be combined",
    ),
    (
        "output gate",
        dict(cla_share_factor=2, attention_output_gate=True),
        r"attention_output_gate=True cannot be combined",
    ),
    ("qk clip", dict(cla_share_factor=2, qk_clip=True), r"qk_clip=True cannot be combined"),
    (
        "flash decode",
        dict(cla_share_factor=2, flash_decode=True),
        r"flash_decode=True cannot be combined",
    ),
    (
        "fp8 MHA",
        dict(cla_share_factor=2, fp8_multi_head_attention=True),
        r"fp8_multi_head_attention=True cannot be combined",
    ),
    (
        "cpu offloading",
        dict(cla_share_factor=2, cpu_offloading=True),
        r"cpu_offloading=True cannot be combined",
    ),
    (
        "heterogeneous",
        dict(cla_share_factor=2, heterogeneous_block_specs=True),
        r"heterogeneous_block_specs=True cannot be combined",
    ),
    (
        "cuda graph local",
        dict(cla_share_factor=2, cuda_graph_impl="local"),
        r"CUDA graphs that capture attention \(cuda_graph_impl='local'",
    ),
    (
        "cuda graph TE attn",
        dict(cla_share_factor=2, cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn"]),
        r"CUDA graphs that capture attention.*\['mlp'\]",
    ),
    (
        "offload core_attn",
        dict(
            cla_share_factor=2,
            fine_grained_activation_offloading=True,
            offload_modules=["core_attn"],
        ),
        r"offloading of \['core_attn'\] frees the K/V storage",
    ),
    (
        "offload qkv_linear",
        dict(
            cla_share_factor=2,
            fine_grained_activation_offloading=True,
            offload_modules=["qkv_linear"],
        ),
        r"offloading of \['qkv_linear'\]",
    ),
    (
        "no_rope in group",
        dict(cla_share_factor=2, no_rope_freq=[0, 1, 0, 0, 0, 0]),
        r"consumer layer 2 no RoPE but its producer layer 1 RoPE",
    ),
    (
        "PP even split",
        dict(cla_share_factor=2, **PP),
        r"Pipeline stage 1 would start at layer 4, a CLA consumer of layer 3.*"
        r'pipeline_model_parallel_layout="Et\*2\|t\*4L"',
    ),
    (
        "PP uneven first stage",
        dict(cla_share_factor=2, num_layers_in_first_pipeline_stage=3, **PP),
        r"stage 1 would start at layer 4",
    ),
    (
        "PP embedding in split",
        dict(cla_share_factor=2, num_layers=7, account_for_embedding_in_pipeline_split=True, **PP),
        r"stage 1 would start at layer 4",
    ),
    (
        "PP layout",
        dict(cla_share_factor=2, pipeline_model_parallel_layout="Ettt|tttL", **PP),
        r"stage 1 would start at layer 4",
    ),
    (
        "VPP chunk",
        dict(cla_share_factor=2, num_layers=12, virtual_pipeline_model_parallel_size=2, **PP),
        r"stage 1 \(virtual chunk 0\) would start at layer 4.*Groups: \[1 2\] \[3 4\]",
    ),
    (
        "VPP too many chunks",
        dict(cla_share_factor=3, num_layers=12, virtual_pipeline_model_parallel_size=3, **PP),
        r"fewer pipeline stages or virtual chunks than producer layers",
    ),
]


@pytest.mark.parametrize(
    "overrides,message", [c[1:] for c in INVALID_CONFIGS], ids=[c[0] for c in INVALID_CONFIGS]
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_table_is_large_enough():
    assert len(INVALID_CONFIGS) >= 20


@pytest.mark.parametrize(
    "pp,vp,layers,sharing",
    [
        (2, None, 6, dict(cla_share_factor=2)),
        (2, 2, 12, dict(cla_share_factor=2)),
        (4, None, 10, dict(cla_producer_layers=[1, 2, 4, 6, 8, 10])),
        (4, None, 12, dict(cla_share_factor=2)),
    ],
)
def test_suggested_layout_is_accepted(pp, vp, layers, sharing):
    with pytest.raises(ValueError) as err:
        tiny_config(
            num_layers=layers,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp,
            **sharing,
        )
    layout = re.search(r'pipeline_model_parallel_layout="([^"]+)"', str(err.value)).group(1)
    tiny_config(
        num_layers=layers,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_layout=layout,
        **sharing,
    )


def test_valid_pipeline_splits_pass():
    tiny_config(cla_share_factor=3, **PP)  # stages [1 2 3] [4 5 6]
    tiny_config(cla_share_factor=2, num_layers=8, virtual_pipeline_model_parallel_size=2, **PP)
    tiny_config(cla_share_factor=2, cuda_graph_impl="transformer_engine", cuda_graph_scope=["mlp"])


def test_features_are_free_without_consumers():
    """S = 1 is stock attention: nothing is rejected."""
    tiny_config(cla_share_factor=1, qk_clip=True, **PP)


def test_spec_rejects_cross_attention(single_rank):
    stock = get_gpt_layer_local_spec()
    stock.submodules.cross_attention = ModuleSpec(module=type("X", (), {}))
    spec = cla_layer_spec_from_stock(stock)
    with pytest.raises(ValueError, match="cannot have cross-attention"):
        build_gpt(tiny_config(cla_share_factor=2), spec)


def test_spec_rejects_mla():
    with pytest.raises(ValueError, match="Multi-latent attention cannot share"):
        get_gpt_layer_with_cla_local_spec(multi_latent_attention=True)


def _plain_config(**overrides):
    settings = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=1,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def test_plain_config_without_sharing_is_an_error(single_rank):
    with pytest.raises(ValueError, match="No CLA sharing configured for this TransformerConfig"):
        build_gpt(_plain_config(), get_gpt_layer_with_cla_local_spec())


def test_spec_and_config_must_agree(single_rank):
    spec = get_gpt_layer_with_cla_local_spec(cla_share_factor=2)
    with pytest.raises(ValueError, match=r"spec says producers \[1, 3, 5\] but the config says"):
        build_gpt(tiny_config(cla_share_factor=3), spec)


def test_spec_params_validate_pipeline_at_layer_build(single_rank):
    spec = get_gpt_layer_with_cla_local_spec(cla_share_factor=2)
    config = _plain_config(
        num_layers=6, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32
    )
    with pytest.raises(ValueError, match="Pipeline stage 1 would start at layer 4"):
        build_gpt(config, spec)


def test_env_settings_are_validated(single_rank, monkeypatch):
    spec = get_gpt_layer_with_cla_local_spec()
    spec.params["cla_settings_from_env"] = True
    monkeypatch.delenv(ENV_SHARE_FACTOR, raising=False)
    with pytest.raises(ValueError, match=f"neither {ENV_SHARE_FACTOR}"):
        build_gpt(_plain_config(), spec)
    monkeypatch.setenv(ENV_SHARE_FACTOR, "two")
    with pytest.raises(ValueError, match="Cannot parse"):
        build_gpt(_plain_config(), spec)
    monkeypatch.setenv(ENV_SHARE_FACTOR, "5")
    with pytest.raises(ValueError, match="cla_share_factor=5 exceeds num_layers=4"):
        build_gpt(_plain_config(), spec)


def test_cla_config_is_a_transformer_config():
    assert issubclass(CLATransformerConfig, TransformerConfig)


def test_local_spec_rejects_fp8():
    """The local spec's linears have no FP8 GEMMs: asking for FP8 there must not run in bf16."""
    config = tiny_config(cla_share_factor=2)
    config.fp8, config.bf16 = "hybrid", True  # as a TE run's config would carry
    with pytest.raises(ValueError, match=r"fp8='hybrid' with the local spec.*silently run in bf16"):
        get_cla_decoder_block_spec(config, use_transformer_engine=False)


def test_local_spec_rejects_context_parallelism():
    config = tiny_config(cla_share_factor=2)
    config.context_parallel_size = 2
    with pytest.raises(ValueError, match=r"context_parallel_size=2 with the local spec"):
        get_cla_decoder_block_spec(config, use_transformer_engine=False)
