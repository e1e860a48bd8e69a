"""S = 1 is Megatron's stock layer: same parameters, bit-identical loss and gradients."""

import pytest
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)

from megatron_cla import get_gpt_layer_with_cla_local_spec
from tests.helpers import (
    assert_grads_equal,
    assert_same_model_step,
    build_cla_gpt,
    build_gpt,
    loss_and_grads,
    make_batch,
    tiny_config,
)

RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
}


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_layer_spec_s1_is_bitwise_stock(single_rank, recompute):
    config = tiny_config(num_query_groups=2, **RECOMPUTE[recompute])
    stock = build_gpt(config, get_gpt_layer_local_spec(normalization="RMSNorm"))
    cla = build_gpt(config, get_gpt_layer_with_cla_local_spec(normalization="RMSNorm"))
    assert [n for n, _ in stock.named_parameters()] == [n for n, _ in cla.named_parameters()]
    batch = make_batch()
    loss_s, grads_s = loss_and_grads(stock, batch)
    loss_c, grads_c = loss_and_grads(cla, batch)
    assert loss_s.item() == loss_c.item()
    assert_grads_equal(grads_c, grads_s)


def test_block_spec_s1_is_bitwise_stock(single_rank):
    config = tiny_config(num_query_groups=1, cla_share_factor=1)
    stock = build_gpt(config, get_gpt_decoder_block_spec(config, False, normalization="RMSNorm"))
    cla = build_cla_gpt(config)
    assert_same_model_step(cla, stock, make_batch(seed=3))
    assert not config.hetereogenous_dist_checkpoint  # stock checkpoint layout kept at S = 1
