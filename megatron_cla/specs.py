"""Layer and block specs with cross-layer attention, derived from Megatron's own GPT specs.

Every function here asks Megatron for its stock spec (same keyword options: ``qk_layernorm``,
``normalization``, ``num_experts``, ...) and changes only the attention: producers keep the stock
``SelfAttention`` submodules under :class:`~megatron_cla.attention.CLAProducerAttention`, consumers
get a query projection of the *same* linear class as the producer's ``linear_qkv`` (so the TE spec
fuses the input norm into ``linear_q`` exactly as it does into ``linear_qkv``).

Use them three ways:

* your own code:
  ``GPTModel(config, get_cla_decoder_block_spec(config, use_transformer_engine=...))``
  or the single-layer specs below;
* Megatron-Bridge / NeMo: ``functools.partial(get_cla_decoder_block_spec,
  use_transformer_engine=True)`` is a ``(config, vp_stage=None)`` spec callable;
* an unmodified ``pretrain_gpt.py --spec megatron_cla.pretrain_gpt_spec <attr>`` (see that module).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional, Sequence

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_cla._compat import require_transformer_engine
from megatron_cla.attention import (
    CLAConsumerAttention,
    CLAConsumerAttentionSubmodules,
    CLAProducerAttention,
)
from megatron_cla.layer import CLATransformerLayer, CLATransformerLayerSubmodules, resolve_sharing
from megatron_cla.validation import validate_cla_setup

__all__ = [
    "cla_layer_spec_from_stock",
    "get_gpt_layer_with_cla_local_spec",
    "get_gpt_layer_with_cla_transformer_engine_spec",
    "get_cla_decoder_layer_specs",
    "get_cla_decoder_block_spec",
    "cla_block_spec_local",
    "cla_block_spec_te",
]


def _sharing_params(
    share_factor: Optional[int], producer_layers: Optional[Sequence[int]]
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if share_factor is not None:
        params["cla_share_factor"] = share_factor
    if producer_layers is not None:
        params["cla_producer_layers"] = list(producer_layers)
    return params


def cla_layer_spec_from_stock(stock: ModuleSpec, **layer_params: Any) -> ModuleSpec:
    """Turn a stock GPT ``TransformerLayer`` spec into a CLA layer spec.

    Args:
        stock: a ``ModuleSpec(TransformerLayer, submodules=TransformerLayerSubmodules(...))`` whose
            ``self_attention`` is a ``SelfAttention`` spec, as Megatron's GPT spec functions return.
        **layer_params: extra ``CLATransformerLayer`` arguments (``cla_share_factor``, ...).

    Raises:
        ValueError: for layers CLA cannot be applied to (MLA, other attention classes, custom
            layer classes).
    """
    if not isinstance(stock, ModuleSpec) or stock.module is not TransformerLayer:
        raise ValueError(
            f"CLA can only replace the attention of a stock TransformerLayer spec, got "
            f"{getattr(stock, 'module', stock)!r}."
        )
    attn = stock.submodules.self_attention
    if not isinstance(attn, ModuleSpec) or attn.module is not SelfAttention:
        raise ValueError(
            f"CLA needs standard self-attention (SelfAttention with linear_qkv), got "
            f"{getattr(attn, 'module', attn)!r}. Multi-latent attention cannot share K/V this way."
        )
    producer = dataclasses.replace(attn, module=CLAProducerAttention)
    consumer = ModuleSpec(
        module=CLAConsumerAttention,
        params=dict(attn.params),
        submodules=CLAConsumerAttentionSubmodules(
            linear_q=attn.submodules.linear_qkv,
            core_attention=attn.submodules.core_attention,
            linear_proj=attn.submodules.linear_proj,
            q_layernorm=attn.submodules.q_layernorm,
        ),
    )
    fields = {
        f.name: getattr(stock.submodules, f.name) for f in dataclasses.fields(stock.submodules)
    }
    fields["self_attention"] = producer
    return ModuleSpec(
        module=CLATransformerLayer,
        params={**stock.params, **layer_params},
        submodules=CLATransformerLayerSubmodules(**fields, consumer_self_attention=consumer),
    )


def get_gpt_layer_with_cla_local_spec(
    *,
    cla_share_factor: Optional[int] = None,
    cla_producer_layers: Optional[Sequence[int]] = None,
    **megatron_kwargs: Any,
) -> ModuleSpec:
    """CLA version of Megatron's ``get_gpt_layer_local_spec`` (Megatron-Core modules only).

    Args:
        cla_share_factor: S, if the config does not carry it (plain ``TransformerConfig``).
        cla_producer_layers: explicit producer layers instead of S.
        **megatron_kwargs: any keyword of ``get_gpt_layer_local_spec`` of the installed
            megatron-core (``qk_layernorm``, ``normalization``, ``num_experts``, ...).
    """
    stock = gpt_layer_specs.get_gpt_layer_local_spec(**megatron_kwargs)
    params = _sharing_params(cla_share_factor, cla_producer_layers)
    return cla_layer_spec_from_stock(stock, **params)


def get_gpt_layer_with_cla_transformer_engine_spec(
    *,
    cla_share_factor: Optional[int] = None,
    cla_producer_layers: Optional[Sequence[int]] = None,
    **megatron_kwargs: Any,
) -> ModuleSpec:
    """CLA version of ``get_gpt_layer_with_transformer_engine_spec`` (TE linears and attention).

    Consumers get a ``TELayerNormColumnParallelLinear`` query projection with the input norm fused
    in, like the producers' ``linear_qkv``.

    Raises:
        ImportError: if Transformer Engine is not installed.
    """
    require_transformer_engine("get_gpt_layer_with_cla_transformer_engine_spec")
    stock = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**megatron_kwargs)
    params = _sharing_params(cla_share_factor, cla_producer_layers)
    return cla_layer_spec_from_stock(stock, **params)


def _check_backend(config: Any, use_transformer_engine: bool) -> None:
    """FP8 and context parallelism exist only in the Transformer Engine spec."""
    if use_transformer_engine:
        require_transformer_engine("CLA block specs with use_transformer_engine=True")
        return
    if getattr(config, "fp8", None):
        raise ValueError(
            f"fp8={config.fp8!r} with the local spec: Megatron's local linears have no FP8 GEMMs "
            f"and would silently run in {'bf16' if config.bf16 else 'full precision'}. Fix: "
            f"use_transformer_engine=True (cla_block_spec_te), or fp8=None."
        )
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError(
            f"context_parallel_size={config.context_parallel_size} with the local spec: only "
            f"Transformer Engine's attention splits a sequence over ranks. Fix: "
            f"use_transformer_engine=True (cla_block_spec_te), or context_parallel_size=1."
        )


def _checked_block_options(
    config: Any, use_transformer_engine: bool, sharing: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the CLA setup; (the options Megatron's block-spec functions take from the
    config, the CLA layer params that fix the resolved producers)."""
    _check_backend(config, use_transformer_engine)
    resolved = resolve_sharing(
        config,
        sharing.get("cla_share_factor"),
        sharing.get("cla_producer_layers"),
        bool(sharing.get("cla_settings_from_env")),
    )
    validate_cla_setup(config, resolved)
    options = dict(normalization=config.normalization, qk_l2_norm=config.qk_l2_norm)
    return options, ({"cla_producer_layers": list(resolved.producer_layers)} if sharing else {})


def get_cla_decoder_layer_specs(
    config: Any, *, use_transformer_engine: bool, **sharing: Any
) -> list[ModuleSpec]:
    """One CLA layer spec per decoder layer of ``config`` (MoE layer pattern included);
    ``sharing`` as in :func:`get_cla_decoder_block_spec`."""
    options, params = _checked_block_options(config, use_transformer_engine, sharing)
    stock = gpt_layer_specs.get_gpt_decoder_layer_specs(config, use_transformer_engine, **options)
    return [cla_layer_spec_from_stock(spec, **params) for spec in stock]


def get_cla_decoder_block_spec(
    config: Any,
    *,
    use_transformer_engine: bool,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    cla_share_factor: Optional[int] = None,
    cla_producer_layers: Optional[Sequence[int]] = None,
    cla_settings_from_env: bool = False,
) -> TransformerBlockSubmodules:
    """The CLA layers of one pipeline stage / virtual chunk, as a block spec.

    The sharing comes from ``cla_share_factor`` / ``cla_producer_layers`` /
    ``cla_settings_from_env`` (the environment variables), or else from ``config``
    (``CLATransformerConfig`` or an object with those fields). Invalid settings and pipeline splits
    that start a chunk on a consumer raise ``ValueError`` here, before the model is built.
    """
    sharing = {
        k: v
        for k, v in dict(
            cla_share_factor=cla_share_factor,
            cla_producer_layers=cla_producer_layers,
            cla_settings_from_env=cla_settings_from_env,
        ).items()
        if v not in (None, False)
    }
    options, params = _checked_block_options(config, use_transformer_engine, sharing)
    stock = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine, vp_stage=vp_stage, pp_rank=pp_rank, **options
    )
    return TransformerBlockSubmodules(
        layer_specs=[cla_layer_spec_from_stock(spec, **params) for spec in stock.layer_specs],
        layer_norm=stock.layer_norm,
    )


cla_block_spec_local = partial(get_cla_decoder_block_spec, use_transformer_engine=False)
"""Megatron-Bridge / NeMo spec callable ``(config, vp_stage=None)``, local backend."""

cla_block_spec_te = partial(get_cla_decoder_block_spec, use_transformer_engine=True)
"""Megatron-Bridge / NeMo spec callable ``(config, vp_stage=None)``, Transformer Engine backend."""
