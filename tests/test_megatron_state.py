"""The Megatron-Bridge recipe: ``cla_state_dict`` turns a stock Megatron model's own
``state_dict()`` into the CLA model's, which loads it strictly and gives the plain-PyTorch
reference's logits for those weights; on tensor-parallel shards it gives the shards of the
one-rank conversion; what it cannot convert is one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_cla.conversion.megatron_state import cla_state_dict
from megatron_cla.testing.distributed import init_process_group_once, model_parallel
from tests.hf_helpers import megatron_model, probe_tokens, relative_error, variant_config
from tests.reference_cla import RefConfig, reference_logits

VOCAB = 128
MODEL = (
    "model.num_layers=4",
    "model.num_query_groups=2",
    "model.qkv_bias=true",
    "model.qk_layernorm=true",
)


def _config(tmp_path, *extra: str):
    return variant_config(tmp_path / "run", tmp_path, *MODEL, *extra)


def _stock_state(tmp_path) -> dict[str, torch.Tensor]:
    from megatron_cla.training.model import unwrap

    with model_parallel():
        return unwrap(megatron_model(_config(tmp_path), VOCAB, seed=4)).state_dict()


def test_the_cla_model_loads_the_converted_stock_state_dict(tmp_path):
    from megatron_cla.training.model import unwrap

    init_process_group_once()
    stock = _stock_state(tmp_path)
    with model_parallel():
        cla = unwrap(megatron_model(_config(tmp_path, "model.cla_share_factor=2"), VOCAB, seed=9))
        converted = cla_state_dict(stock, cla.config)
        cla.load_state_dict(converted, strict=True)
        for consumer in (1, 3):
            q = converted[f"decoder.layers.{consumer}.self_attention.linear_q.weight"]
            assert q.shape[0] == 4 * 16  # the query rows of its old linear_qkv
        tokens = probe_tokens(VOCAB)
        with torch.no_grad():
            got = cla(tokens, torch.arange(tokens.shape[1])[None], None)
        params = {n: p.detach() for n, p in cla.named_parameters()}
        reference = RefConfig.of(cla.config, VOCAB, gated=True)
        assert relative_error(got, reference_logits(tokens, params, reference)) < 1e-5


def _provider(**fields) -> SimpleNamespace:
    """What ``cla_state_dict`` reads of a Megatron config / Bridge provider (a CLA2 target)."""
    defaults = dict(num_layers=2, num_attention_heads=4, num_query_groups=2, hidden_size=64)
    return SimpleNamespace(**{**defaults, "cla_share_factor": 2, **fields})


def _shard(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of 2 of the attention tensors: Megatron splits ``linear_qkv`` / ``linear_q``
    rows into contiguous halves (whole K/V groups); norms are replicated."""
    out = {}
    for name, tensor in state.items():
        if ".self_attention." not in name or not torch.is_tensor(tensor):
            continue
        split = ".linear_qkv." in name or ".linear_q." in name
        out[name] = tensor.chunk(2, dim=0)[rank] if split and "layer_norm" not in name else tensor
    return out


def test_each_tensor_parallel_shard_converts_to_its_shard_of_the_whole(tmp_path):
    init_process_group_once()
    stock = _stock_state(tmp_path)
    whole = _provider(num_layers=4, num_query_groups=2, kv_channels=16, gated_linear_unit=True)
    want = cla_state_dict(_shard_free(stock), whole)
    tp2 = _provider(**{**vars(whole), "tensor_model_parallel_size": 2})
    shards = [cla_state_dict(_shard(stock, rank), tp2) for rank in (0, 1)]
    attention = [n for n in want if ".self_attention." in n]
    assert sorted(attention) == sorted(shards[0]) == sorted(shards[1])
    for name in attention:
        split = ".linear_qkv." in name or ".linear_q." in name
        joined = torch.cat([s[name] for s in shards]) if split else shards[0][name]
        assert torch.equal(joined, want[name]), name


def _shard_free(state: dict) -> dict:
    return {n: t for n, t in state.items() if ".self_attention." in n and torch.is_tensor(t)}


def test_transformer_engine_names_move_to_the_consumers_query_projection():
    """TE fuses the input norm into ``linear_qkv`` and keeps ``_extra_state`` beside it."""
    rows, hidden = (4 + 2 * 1) * 8, 32
    config = _provider(num_query_groups=1, kv_channels=8, hidden_size=hidden)
    state = {}
    for i in range(2):
        prefix = f"decoder.layers.{i}.self_attention.linear_qkv."
        state[prefix + "weight"] = torch.randn(rows, hidden)
        state[prefix + "layer_norm_weight"] = torch.randn(hidden)
        state[prefix + "_extra_state"] = None
    out = cla_state_dict(state, config, kv_init="first")
    consumer = "decoder.layers.1.self_attention.linear_q."
    assert sorted(n for n in out if ".layers.1." in n) == [
        consumer + "_extra_state",
        consumer + "layer_norm_weight",
        consumer + "weight",
    ]
    old = "decoder.layers.1.self_attention.linear_qkv."
    assert torch.equal(out[consumer + "layer_norm_weight"], state[old + "layer_norm_weight"])
    assert torch.equal(out[consumer + "weight"], state[old + "weight"][:32])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cla_share_factor": 1}, "the target config has no cla_share_factor > 1"),
        ({"pipeline_model_parallel_size": 2}, "pipeline_model_parallel_size=2: a pipeline"),
        ({"tensor_model_parallel_size": 4}, "num_attention_heads=4, num_query_groups=2 at"),
    ],
    ids=["stock config", "pipeline", "tp splits a group"],
)
def test_what_cannot_be_converted_is_one_line(changes, message):
    with pytest.raises(ValueError) as caught:
        cla_state_dict({}, _provider(**changes))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
