"""``CLATransformerLayer``: a Megatron ``TransformerLayer`` that is a K/V producer or consumer.

The role is decided once, at construction, from the layer's *global* layer number and the model's
:class:`~megatron_cla.sharing.KVSharing`; the layer then builds either the producer attention
(stock ``SelfAttention`` + K/V capture) or the consumer attention (query projection only). The
same spec can therefore be replicated for every layer, which is what ``pretrain_gpt.py --spec``
does. The K/V travel between layers in ``context`` (see :mod:`megatron_cla.kv_handoff`).

Where S comes from, in order:

1. spec params ``cla_share_factor`` / ``cla_producer_layers`` (must agree with the config if it has
   CLA fields too);
2. the config's ``cla_share_factor`` / ``cla_producer_layers`` (``CLATransformerConfig``, or any
   config object with those attributes, e.g. a Megatron-Bridge provider subclass);
3. with spec param ``cla_settings_from_env=True``: the environment variables
   ``MEGATRON_CLA_SHARE_FACTOR`` / ``MEGATRON_CLA_PRODUCER_LAYERS`` (for an unmodified
   ``pretrain_gpt.py``).

No source at all is an error, not plain attention.

In a hybrid stack (``HybridModel``) the stack passes the pattern (``cla_hybrid_layout``): the
sharing then counts attention layers (the k-th ``*`` of the pattern is attention layer k, see
:mod:`megatron_cla.hybrid_layout`) while ``layer_number`` stays Megatron's pattern position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_cla import _compat
from megatron_cla.hybrid_layout import HybridLayout
from megatron_cla.kv_handoff import pack_kv, unpack_kv
from megatron_cla.sharing import KVSharing
from megatron_cla.validation import validate_cla_setup

__all__ = [
    "CLATransformerLayer",
    "CLATransformerLayerSubmodules",
    "ENV_SHARE_FACTOR",
    "ENV_PRODUCER_LAYERS",
    "fixed_or_env_sharing",
    "resolve_sharing",
]

ENV_SHARE_FACTOR = "MEGATRON_CLA_SHARE_FACTOR"
"""Environment variable read by specs built with ``cla_settings_from_env=True``."""

ENV_PRODUCER_LAYERS = "MEGATRON_CLA_PRODUCER_LAYERS"
"""Comma-separated 1-based producer layers, e.g. ``"1,2,4,6"`` (instead of a share factor)."""


@dataclass
class CLATransformerLayerSubmodules(TransformerLayerSubmodules):
    """Stock layer submodules plus the consumer's attention.

    ``self_attention`` is the producer's attention spec; layers that turn out to be consumers
    build ``consumer_self_attention`` instead.
    """

    consumer_self_attention: Union[ModuleSpec, type] = IdentityOp
    """Attention spec for consumer layers (``CLAConsumerAttention``)."""

    def for_role(self, producer: bool) -> TransformerLayerSubmodules:
        """Plain ``TransformerLayerSubmodules`` for a producer or a consumer layer."""
        fields = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)
        }
        if not producer:
            fields["self_attention"] = self.consumer_self_attention
            fields["sharded_state_dict_keys_map"] = {
                k: v.replace("self_attention.linear_qkv.", "self_attention.linear_q.")
                for k, v in self.sharded_state_dict_keys_map.items()
            }
        return TransformerLayerSubmodules(**fields)


def _env_settings() -> tuple[Optional[int], Optional[list[int]]]:
    factor, producers = os.environ.get(ENV_SHARE_FACTOR), os.environ.get(ENV_PRODUCER_LAYERS)
    if factor is None and producers is None:
        raise ValueError(
            f"This CLA spec reads its sharing from the environment, but neither {ENV_SHARE_FACTOR}"
            f" nor {ENV_PRODUCER_LAYERS} is set. Example: export {ENV_SHARE_FACTOR}=2"
        )
    try:
        return (
            None if factor is None else int(factor),
            None if producers is None else [int(p) for p in producers.split(",") if p.strip()],
        )
    except ValueError as err:
        raise ValueError(
            f"Cannot parse {ENV_SHARE_FACTOR}={factor!r} / {ENV_PRODUCER_LAYERS}={producers!r}: "
            f"use an integer and a comma-separated list of integers."
        ) from err


def fixed_or_env_sharing(share_factor: Optional[int]) -> dict[str, Any]:
    """Spec params that fix S, or for ``None`` read the sharing from the environment variables
    (what the ready-made specs of ``pretrain_gpt.py`` / ``pretrain_hybrid.py`` carry)."""
    if share_factor is None:
        return {"cla_settings_from_env": True}
    return {"cla_share_factor": share_factor}


def resolve_sharing(
    config: Any,
    share_factor: Optional[int] = None,
    producer_layers: Optional[Sequence[int]] = None,
    from_env: bool = False,
    layout: Optional[HybridLayout] = None,
) -> KVSharing:
    """The ``KVSharing`` a CLA layer of ``config`` uses (see the module docstring for the order).

    With a hybrid ``layout`` the sharing counts its attention layers, else ``config.num_layers``.
    """
    n = config.num_layers if layout is None else layout.num_attention_layers
    scope = None if layout is None else layout.sharing_scope
    cfg_factor = getattr(config, "cla_share_factor", None)
    cfg_producers = getattr(config, "cla_producer_layers", None)
    cfg_has = cfg_factor is not None or cfg_producers is not None
    if from_env:
        share_factor, producer_layers = _env_settings()
    spec_has = share_factor is not None or producer_layers is not None
    if spec_has and cfg_has:
        spec = KVSharing.from_settings(n, share_factor, producer_layers, scope)
        cfg = KVSharing.from_settings(n, cfg_factor, cfg_producers, scope)
        if spec != cfg:
            raise ValueError(
                f"The CLA spec says producers {list(spec.producer_layers)} but the config says "
                f"{list(cfg.producer_layers)} (cla_share_factor={cfg_factor}, "
                f"cla_producer_layers={cfg_producers}). Set the sharing in one place."
            )
        return cfg
    if spec_has:
        return KVSharing.from_settings(n, share_factor, producer_layers, scope)
    if cfg_has:
        return KVSharing.from_settings(n, cfg_factor, cfg_producers, scope)
    raise ValueError(
        f"No CLA sharing configured for this {type(config).__name__}: use "
        f"megatron_cla.CLATransformerConfig(cla_share_factor=...), pass cla_share_factor to the "
        f"spec function, or use a spec that reads {ENV_SHARE_FACTOR}."
    )


class CLATransformerLayer(TransformerLayer):
    """A transformer layer that produces or consumes cross-layer K/V (see module docstring)."""

    def __init__(
        self,
        config: Any,
        submodules: Optional[CLATransformerLayerSubmodules] = None,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection: Any = None,
        vp_stage: Optional[int] = None,
        *,
        cla_share_factor: Optional[int] = None,
        cla_producer_layers: Optional[Sequence[int]] = None,
        cla_settings_from_env: bool = False,
        cla_submodules_factory: Optional[Callable[[Any], CLATransformerLayerSubmodules]] = None,
        cla_hybrid_layout: Optional[HybridLayout] = None,
        cla_requires_hybrid_layout: bool = False,
        **kwargs: Any,
    ) -> None:
        layout = cla_hybrid_layout
        if cla_requires_hybrid_layout and layout is None:
            raise ValueError(
                "This CLA attention layer comes from a hybrid stack spec and must be built by "
                "megatron_cla's CLAHybridStack, which tells it the pattern; it was built by "
                "another stack (e.g. Megatron's own HybridStack for multi-token-prediction "
                "layers, which CLA does not support). Drop the MTP part of the pattern."
            )
        sharing = resolve_sharing(
            config, cla_share_factor, cla_producer_layers, cla_settings_from_env, layout
        )
        validate_cla_setup(config, sharing, layout)
        if submodules is None:
            if cla_submodules_factory is None:
                raise ValueError("CLATransformerLayer needs submodules or cla_submodules_factory.")
            submodules = cla_submodules_factory(config)
        _check_submodules(submodules)
        number = _compat.global_layer_number(config, layer_number, vp_stage, pg_collection, kwargs)
        attention = number if layout is None else layout.attention_number(number)
        producer = sharing.is_producer(attention) or bool(kwargs.get("is_mtp_layer", False))
        if not producer:
            _check_starts_on_producer(
                layout, sharing, number, layer_number, kwargs.get("pp_layer_offset")
            )
        super().__init__(
            config,
            submodules.for_role(producer),
            layer_number,
            hidden_dropout,
            pg_collection,
            vp_stage,
            **kwargs,
        )
        if self.layer_number != number:
            raise RuntimeError(
                f"megatron_cla computed global layer {number} but TransformerLayer has "
                f"{self.layer_number}: this megatron-core is not supported by _compat."
            )
        self.cla_sharing = sharing
        """Producer/consumer assignment over attention-layer numbers."""
        self.cla_is_producer = producer
        self.cla_attention_number = attention
        """This layer's attention-layer number (= ``layer_number`` in a GPT decoder)."""
        self.cla_producer_layer = attention if producer else sharing.producer_of(attention)
        """Attention-layer number of the producer whose K/V this layer attends over."""
        self.cla_producer_layer_number = (
            layout.layer_number_of(self.cla_producer_layer) if layout else self.cla_producer_layer
        )
        """Megatron layer number (pattern position in a hybrid stack) of that producer."""
        self.cla_ends_group = bool(kwargs.get("is_mtp_layer")) or sharing.is_last_of_group(
            attention
        )
        if not producer:
            self.self_attention.cla_producer_layer_number = self.cla_producer_layer_number
        if sharing.has_consumers:
            # Megatron's stacked checkpoint layout needs one tensor shape per key across layers;
            # producers and consumers differ, so store layers under their own keys.
            config.hetereogenous_dist_checkpoint = True

    def _forward_attention(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Self-attention (+ residual); returns the K/V hand-off for the next layer."""
        ctx = kwargs.get("inference_context") or kwargs.get("inference_params")
        if ctx is not None and not ctx.is_static_batching():
            return self._forward_attention_paged(ctx, hidden_states, attention_mask, args, kwargs)
        if self.cla_is_producer and self.cla_ends_group:
            hidden_states, _ = super()._forward_attention(
                hidden_states, attention_mask, None, *args, **kwargs
            )
            return hidden_states, None
        if self.cla_is_producer:
            with self.self_attention.capturing_kv():
                hidden_states, _ = super()._forward_attention(
                    hidden_states, attention_mask, None, *args, **kwargs
                )
            return hidden_states, pack_kv(*self.self_attention.take_captured_kv())
        key, value = unpack_kv(
            context, layer_number=self.layer_number, producer_layer=self.cla_producer_layer
        )
        with self.self_attention.attending_over(key, value):
            hidden_states, _ = super()._forward_attention(
                hidden_states, attention_mask, None, *args, **kwargs
            )
        return hidden_states, (None if self.cla_ends_group else context)

    def _forward_attention_paged(
        self, ctx: Any, hidden_states: torch.Tensor, attention_mask: Any, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, None]:
        """Dynamic batching: producers append to their slot of the paged cache, consumers read
        it. Nothing travels in ``context``."""
        ctx_sharing = getattr(ctx, "cla_sharing", None)
        if self.cla_sharing.has_consumers and ctx_sharing != self.cla_sharing:
            raise ValueError(
                f"CLA layer {self.layer_number}: this {type(ctx).__name__} was not built for this "
                f"model's producers {list(self.cla_sharing.producer_layers)} (it has "
                f"{'a slot for every layer' if ctx_sharing is None else ctx_sharing.describe()}). "
                f"Build it with megatron_cla.inference.CLADynamicInferenceContext.for_model(model, "
                f"...) or use megatron_cla.inference.CLAStaticInferenceEngine."
            )
        reading = (
            contextlib.nullcontext()
            if self.cla_is_producer
            else self.self_attention.reading_paged_cache()
        )
        with reading:
            hidden_states, _ = super()._forward_attention(
                hidden_states, attention_mask, None, *args, **kwargs
            )
        return hidden_states, None


def _check_starts_on_producer(
    layout: Optional[HybridLayout],
    sharing: KVSharing,
    number: int,
    local_number: int,
    pp_layer_offset: Optional[int],
) -> None:
    """A consumer may not be the first attention layer of its pipeline stage / virtual chunk
    (nothing hands it K/V there)."""
    if layout is None:
        if local_number == 1:
            raise ValueError(
                f"Layer {number} is the first layer of its pipeline stage but a CLA consumer of "
                f"layer {sharing.producer_of(number)}; groups: {sharing.describe()}. Every "
                f"pipeline stage and virtual chunk must start on a producer."
            )
        return
    before = layout.layer_types[(pp_layer_offset or 0) : number - 1]
    if "*" not in before:
        k = layout.attention_number(number)
        raise ValueError(
            f"Attention layer {k} (pattern layer {number}) is the first attention layer of its "
            f"pipeline segment but a CLA consumer of attention layer {sharing.producer_of(k)}; "
            f"groups: {layout.describe(sharing)}. Every segment's first attention layer must be "
            f"a producer: move the '|' of hybrid_layer_pattern={layout.pattern!r}."
        )


def _check_submodules(submodules: Any) -> None:
    if not isinstance(submodules, CLATransformerLayerSubmodules):
        raise ValueError(
            f"CLATransformerLayer needs CLATransformerLayerSubmodules, got "
            f"{type(submodules).__name__}: build the spec with megatron_cla's spec functions."
        )
    cross = submodules.cross_attention
    if cross is not IdentityOp and getattr(cross, "module", None) is not IdentityOp:
        raise ValueError(
            f"CLA layers cannot have cross-attention (got {cross!r}): cross-attention uses the "
            f"same `context` slot that carries CLA's K/V. Use a decoder-only spec."
        )
