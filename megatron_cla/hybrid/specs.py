"""Hybrid stack specs with cross-layer attention, for Megatron-Core's ``HybridModel``.

:func:`get_cla_hybrid_stack_spec` returns a ``hybrid_stack_spec``: the stock one with
:class:`~megatron_cla.hybrid.stack.CLAHybridStack` as the stack and CLA producer/consumer
attention in the ``*`` slot. With ``use_transformer_engine=True`` every other slot is Megatron's
own (``megatron.core.models.hybrid.hybrid_layer_specs.hybrid_stack_spec``); with the local backend
the ``*``, ``-`` and ``E`` slots are Megatron's local GPT modules split into attention-only,
MLP-only and MoE-only layers (Megatron ships no local hybrid spec), and ``M``/``G`` slots are
Megatron's TE-based Mamba-2/GDN layers when Transformer Engine is installed.

Use it three ways:

* your own code: ``HybridModel(config, get_cla_hybrid_stack_spec(use_transformer_engine=True,
  cla_share_factor=2), ..., hybrid_layer_pattern="*-*-M*-*-")``;
* Megatron-Bridge: ``cla_hybrid_stack_spec_te`` / ``cla_hybrid_stack_spec_local`` are
  ``(provider=None)`` callables (the provider carries ``cla_share_factor``);
* an unmodified ``pretrain_hybrid.py --spec megatron_cla.pretrain_hybrid_spec <attr>``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_cla._compat import require_transformer_engine, transformer_engine_available
from megatron_cla.hybrid.stack import CLAHybridStack, CLAHybridStackSubmodules, UnavailableLayer
from megatron_cla.specs import cla_layer_spec_from_stock

__all__ = [
    "get_cla_hybrid_stack_spec",
    "hybrid_submodules",
    "hybrid_submodules_from_config",
    "cla_hybrid_stack_spec_local",
    "cla_hybrid_stack_spec_te",
]

_ATTENTION_PARTS = ("input_layernorm", "self_attention", "self_attn_bda")
_MLP_PARTS = ("pre_mlp_layernorm", "mlp", "mlp_bda")
_KEY_PREFIX = {"input_layernorm": "input_layernorm.", "pre_mlp_layernorm": "pre_mlp_layernorm."}


def _only(layer: TransformerLayerSubmodules, parts: Sequence[str]) -> TransformerLayerSubmodules:
    """The ``parts`` of a GPT layer's submodules, every other part left at its default."""
    keep = {p: getattr(layer, p) for p in parts}
    prefixes = [_KEY_PREFIX[p] for p in parts if p in _KEY_PREFIX]
    keep["sharded_state_dict_keys_map"] = {
        k: v for k, v in layer.sharded_state_dict_keys_map.items() if k in prefixes
    }
    return TransformerLayerSubmodules(**keep)


def _gpt_layer(use_transformer_engine: bool, **options: Any) -> TransformerLayerSubmodules:
    if use_transformer_engine:
        options.pop("normalization", None)  # TE's fused norms follow config.normalization
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules(**options)
    return gpt_layer_specs.get_gpt_layer_local_submodules(**options)


def _attention_layer(use_transformer_engine: bool, **options: Any) -> ModuleSpec:
    """The CLA layer for ``*`` slots: Megatron's GPT attention (with qk-norm options), no MLP."""
    layer = _gpt_layer(use_transformer_engine, **options)
    stock = ModuleSpec(module=TransformerLayer, submodules=_only(layer, _ATTENTION_PARTS))
    return cla_layer_spec_from_stock(stock, cla_requires_hybrid_layout=True)


def _unavailable(symbol: str, what: str) -> ModuleSpec:
    reason = (
        f"hybrid_layer_pattern has '{symbol}' ({what}) layers, which need Megatron's Transformer "
        f"Engine based layer and CUDA kernels; Transformer Engine is not installed here. Install "
        f"megatron-cla[te] on a GPU machine, or remove '{symbol}' from the pattern."
    )
    return ModuleSpec(module=UnavailableLayer, params={"reason": reason})


def _local_submodules(moe_grouped_gemm: bool, **options: Any) -> CLAHybridStackSubmodules:
    layer = _gpt_layer(False, **options)
    moe = _only(layer, _MLP_PARTS)
    moe.mlp = get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=moe_grouped_gemm)
    if transformer_engine_available():
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        mamba = hybrid_stack_spec.submodules.mamba_layer
        gdn = hybrid_stack_spec.submodules.gdn_layer
    else:
        mamba, gdn = _unavailable("M", "Mamba-2"), _unavailable("G", "Gated DeltaNet")
    return CLAHybridStackSubmodules(
        mamba_layer=mamba,
        gdn_layer=gdn,
        attention_layer=_attention_layer(False, **options),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=_only(layer, _MLP_PARTS)),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=moe),
        final_norm=layer.input_layernorm,
    )


def _te_submodules(**options: Any) -> CLAHybridStackSubmodules:
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    stock = hybrid_stack_spec.submodules
    fields = {f.name: getattr(stock, f.name) for f in dataclasses.fields(stock)}
    fields.update(attention_layer=_attention_layer(True, **options), mtp_block_spec=None)
    return CLAHybridStackSubmodules(**fields)


def hybrid_submodules(
    use_transformer_engine: bool,
    *,
    qk_layernorm: bool = False,
    qk_l2_norm: bool = False,
    normalization: str = "RMSNorm",
    moe_grouped_gemm: bool = False,
) -> CLAHybridStackSubmodules:
    """The submodules of a CLA hybrid stack for one backend (see the module docstring)."""
    options = dict(qk_layernorm=qk_layernorm, qk_l2_norm=qk_l2_norm, normalization=normalization)
    if use_transformer_engine:
        require_transformer_engine("get_cla_hybrid_stack_spec(use_transformer_engine=True)")
        return _te_submodules(**options)
    return _local_submodules(moe_grouped_gemm, **options)


def hybrid_submodules_from_config(config: Any, use_transformer_engine: bool) -> Any:
    """The submodules for the run's flags (``--qk-layernorm``, ``--normalization``, ...)."""
    return hybrid_submodules(
        use_transformer_engine,
        qk_layernorm=bool(config.qk_layernorm),
        qk_l2_norm=bool(config.qk_l2_norm),
        normalization=config.normalization,
        moe_grouped_gemm=bool(config.moe_grouped_gemm),
    )


def _stack_params(
    cla_share_factor: Optional[int],
    cla_producer_layers: Optional[Sequence[int]],
    hybrid_layer_pattern: Optional[str],
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if cla_share_factor is not None:
        params["cla_share_factor"] = cla_share_factor
    if cla_producer_layers is not None:
        params["cla_producer_layers"] = list(cla_producer_layers)
    if hybrid_layer_pattern is not None:
        params["hybrid_layer_pattern"] = hybrid_layer_pattern
    return params


def get_cla_hybrid_stack_spec(
    *,
    use_transformer_engine: bool,
    cla_share_factor: Optional[int] = None,
    cla_producer_layers: Optional[Sequence[int]] = None,
    hybrid_layer_pattern: Optional[str] = None,
    qk_layernorm: bool = False,
    qk_l2_norm: bool = False,
    normalization: str = "RMSNorm",
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """A ``hybrid_stack_spec`` for ``HybridModel`` with cross-layer attention.

    Args:
        use_transformer_engine: TE linears/attention (and Megatron's Mamba/GDN/MoE layers), or
            Megatron-Core's local modules.
        cla_share_factor: S over the *attention* layers (attention layer 1 = the first ``*``),
            unless the config carries it (``CLATransformerConfig``).
        cla_producer_layers: explicit producer attention layers instead of S.
        hybrid_layer_pattern: the model's pattern. Needed only for pipelined models whose config
            does not carry it (the stack must count attention layers of other stages).
        qk_layernorm, qk_l2_norm: per-head query/key norms.
        normalization: ``RMSNorm`` or ``LayerNorm`` of the local backend (TE follows the config).
        moe_grouped_gemm: grouped GEMM experts in ``E`` slots (local backend).
    """
    submodules = hybrid_submodules(
        use_transformer_engine,
        qk_layernorm=qk_layernorm,
        qk_l2_norm=qk_l2_norm,
        normalization=normalization,
        moe_grouped_gemm=moe_grouped_gemm,
    )
    params = _stack_params(cla_share_factor, cla_producer_layers, hybrid_layer_pattern)
    return ModuleSpec(module=CLAHybridStack, params=params, submodules=submodules)


def _spec_for_provider(config: Any, use_transformer_engine: bool) -> ModuleSpec:
    if config is None:
        return get_cla_hybrid_stack_spec(use_transformer_engine=use_transformer_engine)
    submodules = hybrid_submodules_from_config(config, use_transformer_engine)
    return ModuleSpec(module=CLAHybridStack, submodules=submodules)


def cla_hybrid_stack_spec_local(config: Any = None) -> ModuleSpec:
    """Megatron-Bridge ``HybridModelProvider.hybrid_stack_spec`` callable, local backend: the
    stack spec for ``config``'s options (sharing and pattern are read from it at build)."""
    return _spec_for_provider(config, use_transformer_engine=False)


def cla_hybrid_stack_spec_te(config: Any = None) -> ModuleSpec:
    """Megatron-Bridge ``HybridModelProvider.hybrid_stack_spec`` callable, TE backend."""
    return _spec_for_provider(config, use_transformer_engine=True)
