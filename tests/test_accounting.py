"""KV-cache bytes, parameters and FLOPs accounting against the paper and the real model."""

import pytest

from megatron_cla import KVSharing
from megatron_cla.accounting import DecoderShape, decoder_params, kv_cache_bytes_per_token
from tests.helpers import build_cla_gpt, tiny_config

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
