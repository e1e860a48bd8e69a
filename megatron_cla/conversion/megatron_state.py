"""CLA conversion of a Megatron model's own ``state_dict()``: the Megatron-Bridge recipe.

Bridge loads a stock Hugging Face model into Megatron as it always does (every layer a
producer); :func:`cla_state_dict` turns that model's ``state_dict()`` into the state dict of the
CLA model built with one of our specs, on each tensor-parallel rank for its own shard, and the
CLA model loads it with ``load_state_dict(..., strict=True)``::

    stock = provider.provide_distributed_model(wrap_with_ddp=False)        # Bridge, S = 1
    cla = cla_provider.provide_distributed_model(wrap_with_ddp=False)      # cla_share_factor = 2
    cla[0].load_state_dict(cla_state_dict(stock[0].state_dict(), cla_provider))

It is :func:`~megatron_cla.conversion.cla_weights.share_kv` on the rank's tensors: Megatron
splits ``linear_qkv`` across tensor-parallel ranks by whole K/V groups, so each shard has the
``[q_1 .. q_{H/G}, k, v]`` row layout over the rank's own groups. With the Transformer Engine spec
the input norm lives inside ``linear_qkv`` (``layer_norm_weight``, ``layer_norm_bias``) and moves
to a consumer's ``linear_q`` with it, as does TE's ``_extra_state``.
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron_cla.conversion.cla_weights import share_kv
from megatron_cla.conversion.qkv_layout import AttentionShape
from megatron_cla.sharing import KVSharing

__all__ = ["cla_state_dict", "local_attention_shape", "target_sharing"]


def _setting(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def local_attention_shape(config: Any) -> AttentionShape:
    """The tensor layouts of one tensor-parallel rank of a Megatron ``TransformerConfig`` (or a
    Bridge provider, which is one)."""
    tp = _setting(config, "tensor_model_parallel_size", 1) or 1
    heads = config.num_attention_heads
    groups = _setting(config, "num_query_groups") or heads
    if heads % tp or groups % tp:
        raise ValueError(
            f"num_attention_heads={heads}, num_query_groups={groups} at tensor_model_parallel_size"
            f"={tp}: each rank must hold whole K/V groups; convert at a tensor-parallel size "
            f"that divides {groups}"
        )
    head_dim = _setting(config, "kv_channels") or config.hidden_size // heads
    gated = bool(_setting(config, "gated_linear_unit", False))
    return AttentionShape(heads // tp, groups // tp, head_dim, gated)


def target_sharing(config: Any) -> KVSharing:
    """The sharing ``config`` asks for (``cla_share_factor`` / ``cla_producer_layers``)."""
    if (_setting(config, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise ValueError(
            f"pipeline_model_parallel_size={config.pipeline_model_parallel_size}: a pipeline "
            f"stage's state dict numbers its layers from 0; convert at pipeline size 1 and save "
            f"a distributed checkpoint, which any layout loads"
        )
    share, producers = _setting(config, "cla_share_factor"), _setting(config, "cla_producer_layers")
    if share in (None, 1) and producers is None:
        raise ValueError(
            "the target config has no cla_share_factor > 1 or cla_producer_layers: give the "
            "config of the CLA model (the Bridge provider subclass), not the stock one"
        )
    return KVSharing.from_settings(config.num_layers, share, producers)


def cla_state_dict(
    state_dict: Mapping[str, Any], cla_config: Any, kv_init: str = "mean"
) -> dict[str, Any]:
    """The state dict of the CLA model of ``cla_config`` on this rank, from ``state_dict`` of the
    same model without sharing (every layer a producer) on this rank. ``kv_init``: ``mean`` (each
    producer's K/V is its group's mean) or ``first`` (its own)."""
    shape = local_attention_shape(cla_config)
    return share_kv(dict(state_dict), shape, target_sharing(cla_config), kv_init)
