"""Producer/consumer structure, parameter names, and the no-fallback guarantee."""

import pytest
import torch

from megatron_cla import (
    CLAConsumerAttention,
    CLAProducerAttention,
)
from tests.helpers import SEQ, build_cla_gpt, make_batch, tiny_config


def _model(**overrides):
    config = tiny_config(**overrides)
    return config, build_cla_gpt(config)


SHARINGS = [
    dict(cla_share_factor=2),
    dict(cla_share_factor=3),
    dict(cla_producer_layers=[1, 2, 4, 6]),
]


@pytest.mark.parametrize("sharing", SHARINGS)
def test_roles_follow_sharing(single_rank, sharing):
    config, model = _model(**sharing)
    producers = set(config.cla_sharing.producer_layers)
    for layer in model.decoder.layers:
        attn = layer.self_attention
        if layer.layer_number in producers:
            assert type(attn) is CLAProducerAttention and layer.cla_is_producer
        else:
            assert type(attn) is CLAConsumerAttention and not layer.cla_is_producer
            assert layer.cla_producer_layer == max(p for p in producers if p < layer.layer_number)


def test_consumers_own_no_kv_parameters(single_rank):
    config, model = _model(
        cla_share_factor=2, num_query_groups=2, qk_layernorm=True, normalization="LayerNorm"
    )
    hn, heads, hidden = config.kv_channels, config.num_attention_heads, config.hidden_size
    for layer in model.decoder.layers:
        names = {n: p.shape for n, p in layer.self_attention.named_parameters()}
        if layer.cla_is_producer:
            qkv = (heads + 2 * config.num_query_groups) * hn
            assert names["linear_qkv.weight"] == (qkv, hidden)
            assert "k_layernorm.weight" in names
        else:
            assert names["linear_q.weight"] == (heads * hn, hidden)  # heads contiguous
            assert not any(
                ("linear_qkv" in n or "linear_kv" in n or "k_layernorm" in n) for n in names
            ), names
            assert "q_layernorm.weight" in names


def test_consumer_params_are_fewer(single_rank):
    _, dense = _model(cla_share_factor=1)
    _, cla2 = _model(cla_share_factor=2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # 3 consumers each drop 2 * (ng * hn) * hidden K/V weights and 2 * ng * hn biases
    assert count(dense) - count(cla2) == 3 * (2 * 16 * 64 + 2 * 16)


def test_consumer_without_producer_kv_raises(single_rank):
    _, model = _model(cla_share_factor=2)
    consumer = model.decoder.layers[1]
    hidden = torch.randn(SEQ, 2, 64, device=model.embedding.word_embeddings.weight.device)
    mask = make_batch()["attention_mask"]
    with pytest.raises(RuntimeError, match="consumer layer 2 needs the K/V of its producer"):
        consumer(hidden_states=hidden, attention_mask=mask, context=None)
    with pytest.raises(RuntimeError, match="received a Tensor of shape"):
        consumer(hidden_states=hidden, attention_mask=mask, context=torch.zeros(SEQ, 2, 64))


def test_consumer_attention_alone_raises_without_kv(single_rank):
    _, model = _model(cla_share_factor=2)
    attn = model.decoder.layers[1].self_attention
    with pytest.raises(RuntimeError, match="called without its producer's K/V"):
        attn(torch.randn(SEQ, 2, 64), attention_mask=make_batch()["attention_mask"])


def test_handoff_ends_with_each_group(single_rank):
    config, model = _model(cla_share_factor=3)  # groups [1 2 3] [4 5 6]
    assert [layer.cla_ends_group for layer in model.decoder.layers] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_stock_weights_load_into_producers(single_rank):
    """Producers keep the stock layout: a stock (S = 1) state dict loads into every producer, and
    only the consumers' query projections are left to initialise."""
    _, stock = _model(cla_share_factor=1)
    _, cla2 = _model(cla_share_factor=2)
    state = {
        k: v
        for k, v in stock.state_dict().items()
        if "linear_qkv" not in k or int(k.split(".")[2]) % 2 == 0
    }  # drop K/V weights of the consumer layers 2, 4, 6
    result = cla2.load_state_dict(state, strict=False)
    assert sorted(k for k in result.missing_keys if not k.endswith("_extra_state")) == [
        f"decoder.layers.{i}.self_attention.linear_q.{w}"
        for i in (1, 3, 5)
        for w in ("bias", "weight")
    ]
    for i in (0, 2, 4):
        key = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
        assert torch.equal(cla2.state_dict()[key], stock.state_dict()[key])


class _LinearTakingProcessGroups(torch.nn.Module):
    """A linear class with Megatron-LM main's signature (``pg_collection=``): records it."""

    seen: list = []

    def __init__(self, *args, pg_collection=None, **kwargs):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        super().__init__()
        kwargs.pop("name", None)
        self.inner = ColumnParallelLinear(*args, **kwargs)
        self.weight = self.inner.weight
        _LinearTakingProcessGroups.seen.append(pg_collection)

    def forward(self, x):
        return self.inner(x)


def test_consumer_linear_q_gets_the_process_groups_when_it_takes_them(single_rank):
    """Like Megatron-LM main's linear_qkv (GTP weight remat needs them); 0.16-0.19 linears do
    not take pg_collection and do not get it."""
    from megatron_cla import get_gpt_layer_with_cla_local_spec

    spec = get_gpt_layer_with_cla_local_spec(cla_share_factor=2)
    spec.submodules.consumer_self_attention.submodules.linear_q = _LinearTakingProcessGroups
    _LinearTakingProcessGroups.seen.clear()
    from tests.helpers import build_gpt

    model = build_gpt(tiny_config(cla_share_factor=2), spec)
    consumers = [m for m in model.modules() if isinstance(m, CLAConsumerAttention)]
    assert len(_LinearTakingProcessGroups.seen) == len(consumers) == 3
    assert all(
        pg is c.pg_collection
        for pg, c in zip(_LinearTakingProcessGroups.seen, consumers, strict=True)
    )
    loss = model(*(make_batch()[k] for k in ("tokens", "position_ids", "attention_mask")))
    assert torch.isfinite(loss).all()
