"""KV-cache bytes, parameters and FLOPs accounting against the paper and the real model."""

import pytest

from megatron_cla import KVSharing
from megatron_cla.accounting import (
    DecoderShape,
    decoder_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    mamba_state_bytes,
)
from tests.helpers import build_cla_gpt, tiny_config
from tests.hybrid_helpers import build_cla_hybrid, requires_hybrid, tiny_hybrid_config

# KeepEnds on 20 layers: layer 1 alone, then pairs (2,3), (4,5), ..., layer 20 alone
KEEP_ENDS = KVSharing.from_producer_layers(20, [1, *range(2, 21, 2)])


def _paper_1b(sharing: KVSharing, head_dim: int = 128) -> DecoderShape:
    heads = 2048 // head_dim
    return DecoderShape(20, 2048, heads, 1, head_dim, 5472, True, False, sharing)


@pytest.mark.parametrize(
    "name,sharing,head_dim,expected",
    [  # the paper's Table 1 (MQA, 1B, 16-bit KV)
        ("H128-MQA", KVSharing.uniform(20, 1), 128, 10240),
        ("H64-MQA", KVSharing.uniform(20, 1), 64, 5120),
        ("H512-MQA-CLA2", KVSharing.uniform(20, 2), 512, 20480),
        ("H256-MQA-CLA2", KVSharing.uniform(20, 2), 256, 10240),
        ("H128-MQA-CLA2", KVSharing.uniform(20, 2), 128, 5120),
        ("H128-MQA-CLA3", KVSharing.uniform(20, 3), 128, 3584),
        ("H128-MQA-CLA4", KVSharing.uniform(20, 4), 128, 2560),
        (
            "H128-MQA-CLA2-KeepEnds",
            KEEP_ENDS,
            128,
            5632,
        ),
    ],
)
def test_kv_bytes_match_paper(name, sharing, head_dim, expected):
    assert kv_cache_bytes_per_token(_paper_1b(sharing, head_dim)) == expected, name


@pytest.mark.parametrize(
    "sharing",
    [dict(cla_share_factor=1), dict(cla_share_factor=2), dict(cla_producer_layers=[1, 2, 4, 6])],
)
@pytest.mark.parametrize("gated", [False, True])
def test_decoder_params_count_the_real_model(single_rank, sharing, gated):
    config = tiny_config(
        num_query_groups=2, add_bias_linear=False, gated_linear_unit=gated, **sharing
    )
    model = build_cla_gpt(config)
    linear = sum(
        p.numel()
        for n, p in model.decoder.named_parameters()
        if n.endswith("weight") and "norm" not in n
    )
    assert decoder_params(DecoderShape.from_config(config, config.cla_sharing)) == linear


def _linear_weights(model) -> int:
    return sum(
        p.numel()
        for n, p in model.decoder.named_parameters()
        if n.endswith("weight") and "norm" not in n
    )


@requires_hybrid
@pytest.mark.parametrize(
    "pattern,extra",
    [
        ("*-*-*-*-*-*-", {}),
        ("*E*-*E*-", dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)),
    ],
)
@pytest.mark.parametrize("sharing", [dict(cla_share_factor=1), dict(cla_share_factor=2)])
def test_hybrid_decoder_params_count_the_real_model(single_rank, pattern, extra, sharing):
    config = tiny_hybrid_config(
        pattern, num_query_groups=2, add_bias_linear=False, **sharing, **extra
    )
    shape = DecoderShape.from_config(config, config.cla_sharing)
    assert decoder_params(shape) == _linear_weights(build_cla_hybrid(config))


@requires_hybrid
def test_star_dash_hybrid_is_counted_like_its_gpt_twin():
    gpt = tiny_config(cla_share_factor=2, num_query_groups=2)
    hybrid = tiny_hybrid_config("*-" * 6, cla_share_factor=2, num_query_groups=2)
    shapes = [DecoderShape.from_config(c, c.cla_sharing) for c in (gpt, hybrid)]
    assert decoder_params(shapes[0]) == decoder_params(shapes[1])
    assert kv_cache_bytes_per_token(shapes[0]) == kv_cache_bytes_per_token(shapes[1])
    assert flops_per_token(shapes[0], 128, 96) == flops_per_token(shapes[1], 128, 96)


@requires_hybrid
def test_hybrid_kv_bytes_count_producer_attention_layers():
    """Paper 1B H128-MQA-CLA2 as `*-` x 20: 5,120 bytes/token; Mamba layers hold no KV."""
    paper = dict(hidden_size=2048, num_attention_heads=16, kv_channels=128, num_query_groups=1)
    for pattern in ("*-" * 20, "M*M-" * 20):
        config = tiny_hybrid_config(pattern, cla_share_factor=2, ffn_hidden_size=5472, **paper)
        shape = DecoderShape.from_config(config, config.cla_sharing)
        assert kv_cache_bytes_per_token(shape) == 5120


@requires_hybrid
def test_mamba_shapes_follow_megatrons_mixer():
    """In-projection width z, x, B, C, dt and the state per sequence, as MambaMixer sizes them
    (d_inner = 2 x hidden, heads = d_inner / head_dim)."""
    config = tiny_hybrid_config(
        "*M*-", cla_share_factor=2, mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2
    )
    shape = DecoderShape.from_config(config, config.cla_sharing)
    m = shape.mamba
    assert (m.d_inner, m.heads) == (128, 8)
    assert m.weights(64) == 64 * (2 * 128 + 2 * 2 * 16 + 8) + (128 + 64) * 4 + 128 * 64
    # conv state [channels, 4] + SSM state [heads, head_dim, state] per sequence, 2 bytes
    assert mamba_state_bytes(shape) == ((128 + 64) * 4 + 8 * 16 * 16) * 2
    assert mamba_state_bytes(shape, tensor_parallel=2) == mamba_state_bytes(shape) // 2
