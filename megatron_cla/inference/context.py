"""A paged (dynamic-batching) KV cache that holds K/V for CLA producer layers only.

Megatron-Core's :class:`DynamicInferenceContext` allocates one paged buffer
``[2, kv_layers, blocks, block_tokens, kv_heads, head_dim]`` up front and maps each local layer to a
slot with ``layer_map``. :class:`CLADynamicInferenceContext` sizes that buffer for the producer
layers of this pipeline stage and maps only producers to slots; a consumer reads its producer's
slot and never appends (a consumer asking for a slot of its own gets a ``KeyError``). For a fixed
``buffer_size_gb`` the cache therefore holds S times as many blocks as the model without CLA.

The constructor follows the installed megatron-core (``num_layers=...`` keyword arguments up to
0.16, ``(model_config, inference_config)`` from 0.17); :meth:`CLADynamicInferenceContext.for_model`
builds one the same way on every supported version.

Hybrid models (``HybridModel`` with :class:`~megatron_cla.hybrid.stack.CLAHybridStack`): the slots
are the stage's producer *attention* layers, and Mamba layers keep the per-request state slots
Megatron gives them (Megatron sizes and maps those from the stage's layer types, in which this
context shows consumer attention layers as state-less slots).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Optional

from megatron.core import parallel_state
from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_cla.sharing import KVSharing

__all__ = [
    "CLADynamicInferenceContext",
    "ModelKVSlots",
    "model_kv_slots",
    "model_sharing",
    "local_producer_layers",
]

CONTEXT_TAKES_MODEL_CONFIG = "model_config" in inspect.signature(DynamicInferenceContext).parameters
"""megatron-core >= 0.17: ``DynamicInferenceContext(model_config, inference_config)``."""


@dataclasses.dataclass(frozen=True)
class ModelKVSlots:
    """What a paged cache needs to know about the model chunk it serves."""

    sharing: KVSharing
    """Producer/consumer assignment (over attention layers)."""
    config: Any
    """The model's ``TransformerConfig``."""
    producers: tuple[int, ...]
    """1-based local positions (within this pipeline stage) of the producer layers."""
    layer_types: Optional[tuple[str, ...]] = None
    """Hybrid stacks: the stage's pattern symbols; None for a GPT decoder."""

    def masked_layer_types(self) -> list[str]:
        """The stage's layer types with consumer attention layers shown as MLP slots (no KV)."""
        return [
            "-" if kind == "*" and i + 1 not in self.producers else kind
            for i, kind in enumerate(self.layer_types or ())
        ]


def _decoder(model: Any) -> Any:
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "decoder", None)


def model_kv_slots(model: Any) -> ModelKVSlots:
    """The slots a (possibly wrapped) GPT or hybrid CLA model chunk needs in a paged cache."""
    from megatron_cla.layer import CLATransformerLayer

    decoder = _decoder(model)
    layers = list(getattr(decoder, "layers", []))
    cla = [m for m in layers if isinstance(m, CLATransformerLayer)]
    if not cla:
        raise ValueError(
            f"{type(model).__name__} has no CLATransformerLayer: build it with a megatron_cla "
            f"spec, or use Megatron's own DynamicInferenceContext for a model without CLA."
        )
    producers = tuple(
        i + 1
        for i, m in enumerate(layers)
        if isinstance(m, CLATransformerLayer) and m.cla_is_producer
    )
    types = getattr(decoder, "layer_type_list", None)
    return ModelKVSlots(
        cla[0].cla_sharing, cla[0].config, producers, None if types is None else tuple(types)
    )


def model_sharing(model: Any) -> tuple[KVSharing, Any]:
    """The ``KVSharing`` and config of a (possibly wrapped) model built with CLA layers."""
    slots = model_kv_slots(model)
    return slots.sharing, slots.config


def local_producer_layers(config: Any, sharing: KVSharing, pp_rank: Optional[int] = None) -> list:
    """1-based *local* numbers of the producer layers of a GPT decoder on stage ``pp_rank``
    (from the config, for planning; :func:`model_kv_slots` reads a built model)."""
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    offset = get_transformer_layer_offset(config, vp_stage=None, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=None, pp_rank=pp_rank)
    return [n - offset for n in range(offset + 1, offset + count + 1) if sharing.is_producer(n)]


def _config_with_even_layers(config: Any, layers_per_stage: int) -> Any:
    """A shallow copy of ``config`` on which Megatron counts ``layers_per_stage`` per stage."""
    twin = copy.copy(config)
    twin.num_layers = layers_per_stage * config.pipeline_model_parallel_size
    twin.pipeline_model_parallel_layout = None
    twin.num_layers_in_first_pipeline_stage = None
    twin.num_layers_in_last_pipeline_stage = None
    twin.account_for_embedding_in_pipeline_split = False
    twin.account_for_loss_in_pipeline_split = False
    return twin


def _slots_from(
    bound: Optional[ModelKVSlots], sharing: Optional[KVSharing], config: Any, args: tuple, kw: dict
) -> ModelKVSlots:
    if bound is not None:
        return bound
    if CONTEXT_TAKES_MODEL_CONFIG:
        config = config or kw.get("model_config", args[0] if args else None)
    if sharing is None or config is None:
        raise ValueError(
            "CLADynamicInferenceContext needs the model's sharing and config: use "
            "CLADynamicInferenceContext.for_model(model, ...) or .bind(model)."
        )
    return ModelKVSlots(sharing, config, tuple(local_producer_layers(config, sharing)))


class CLADynamicInferenceContext(DynamicInferenceContext):
    """``DynamicInferenceContext`` whose paged buffer has one slot per producer layer."""

    cla_bound_slots: Optional[ModelKVSlots] = None
    """The model's slots, bound by :meth:`bind` (so Megatron code that instantiates the class
    works)."""

    def __init__(
        self,
        *args: Any,
        cla_sharing: Optional[KVSharing] = None,
        cla_model_config: Any = None,
        cla_slots: Optional[ModelKVSlots] = None,
        **kwargs: Any,
    ) -> None:
        slots = _slots_from(
            cla_slots or self.cla_bound_slots, cla_sharing, cla_model_config, args, kwargs
        )
        producers = list(slots.producers)
        if CONTEXT_TAKES_MODEL_CONFIG:
            args, kwargs = _with_model_config(args, kwargs, slots.config, len(producers))
            args, kwargs = _with_masked_mamba_layers(args, kwargs, slots)
        else:
            kwargs["num_layers"] = len(producers)
        super().__init__(*args, **kwargs)
        if self.num_attention_layers != len(producers):
            raise ValueError(
                f"CLA paged cache: expected {len(producers)} K/V slots, Megatron sized "
                f"{self.num_attention_layers}."
            )
        mamba = {}
        if self.is_hybrid_model:  # Megatron's map of the stage's Mamba layers to state slots
            mamba = {k: v for k, v in self.layer_map.items() if slots.layer_types[k] == "M"}
        self.layer_map = {local - 1: slot for slot, local in enumerate(producers)} | mamba
        self.cla_sharing = slots.sharing
        self.cla_producer_local_layers = producers

    @classmethod
    def bind(cls, model: Any) -> type:
        """A subclass with ``model``'s slots bound, for code that builds the context itself
        (e.g. Megatron's ``StaticInferenceEngine``)."""
        return type(cls.__name__, (cls,), {"cla_bound_slots": model_kv_slots(model)})

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        max_sequence_length: int,
        buffer_size_gb: float,
        block_size_tokens: int = 256,
        max_requests: Optional[int] = None,
        max_tokens: Optional[int] = None,
        **options: Any,
    ) -> CLADynamicInferenceContext:
        """Build the context for ``model`` on any supported megatron-core.

        ``options`` are further constructor arguments (0.16) or ``InferenceConfig`` fields (0.17+).
        A hybrid model's Mamba layers get Megatron's state slots
        (``MambaInferenceStateConfig.from_model``).
        """
        slots = model_kv_slots(model)
        config = slots.config
        settings = dict(
            max_sequence_length=max_sequence_length,
            buffer_size_gb=buffer_size_gb,
            block_size_tokens=block_size_tokens,
            max_requests=max_requests,
            **options,
        )
        if max_tokens is not None:
            settings["max_tokens"] = max_tokens
        if CONTEXT_TAKES_MODEL_CONFIG:
            from megatron.core.inference.config import InferenceConfig, MambaInferenceStateConfig

            settings.setdefault(
                "mamba_inference_state_config", MambaInferenceStateConfig.from_model(model)
            )
            return cls(config, InferenceConfig(**settings), cla_slots=slots)
        return cls(
            params_dtype=config.params_dtype,
            kv_channels=config.kv_channels,
            num_attention_heads=_kv_heads_for_cache(config),
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            cla_slots=slots,
            **settings,
        )

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the paged K/V buffer this context allocated."""
        return self.memory_buffer.numel() * self.memory_buffer.element_size()


def _kv_heads_for_cache(config: Any) -> int:
    """K/V heads to size a 0.16 context with: each TP rank holds at least one.

    With fewer query groups than TP ranks Megatron's attention replicates a K/V head per rank;
    megatron-core 0.16's context would assert on ``groups % tp`` (0.17+ sizes it as here).
    """
    groups = config.num_query_groups or config.num_attention_heads
    return max(groups, config.tensor_model_parallel_size)


def _with_model_config(args: tuple, kwargs: dict, config: Any, kv_layers: int) -> tuple:
    twin = _config_with_even_layers(config, kv_layers)
    if "model_config" in kwargs:
        return args, {**kwargs, "model_config": twin}
    if args:
        return (twin, *args[1:]), kwargs
    return args, {**kwargs, "model_config": twin}


def _with_masked_mamba_layers(args: tuple, kwargs: dict, slots: ModelKVSlots) -> tuple:
    """Show consumer attention layers to Megatron's hybrid bookkeeping as slots without KV."""
    in_kwargs = "inference_config" in kwargs
    inference_config = kwargs["inference_config"] if in_kwargs else args[1]
    mamba = getattr(inference_config, "mamba_inference_state_config", None)
    if mamba is None or slots.layer_types is None:
        return args, kwargs
    masked = dataclasses.replace(mamba, layer_type_list=slots.masked_layer_types())
    inference_config = dataclasses.replace(inference_config, mamba_inference_state_config=masked)
    if in_kwargs:
        return args, {**kwargs, "inference_config": inference_config}
    return (args[0], inference_config, *args[2:]), kwargs
