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
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Optional

from megatron.core import parallel_state
from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_cla.sharing import KVSharing

__all__ = ["CLADynamicInferenceContext", "model_sharing", "local_producer_layers"]

CONTEXT_TAKES_MODEL_CONFIG = "model_config" in inspect.signature(DynamicInferenceContext).parameters
"""megatron-core >= 0.17: ``DynamicInferenceContext(model_config, inference_config)``."""


def model_sharing(model: Any) -> tuple[KVSharing, Any]:
    """The ``KVSharing`` and config of a (possibly wrapped) GPT model built with CLA layers."""
    from megatron_cla.layer import CLATransformerLayer

    layers = [m for m in model.modules() if isinstance(m, CLATransformerLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no CLATransformerLayer: build it with a megatron_cla "
            f"spec, or use Megatron's own DynamicInferenceContext for a model without CLA."
        )
    return layers[0].cla_sharing, layers[0].config


def local_producer_layers(config: Any, sharing: KVSharing, pp_rank: Optional[int] = None) -> list:
    """1-based *local* numbers of the producer layers on pipeline stage ``pp_rank``."""
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


class CLADynamicInferenceContext(DynamicInferenceContext):
    """``DynamicInferenceContext`` whose paged buffer has one slot per producer layer."""

    cla_bound_sharing: Optional[KVSharing] = None
    """Sharing bound by :meth:`bind` (so Megatron code that instantiates the class works)."""

    cla_bound_config: Any = None
    """Model config bound by :meth:`bind`."""

    def __init__(
        self,
        *args: Any,
        cla_sharing: Optional[KVSharing] = None,
        cla_model_config: Any = None,
        **kwargs: Any,
    ) -> None:
        sharing = cla_sharing or self.cla_bound_sharing
        config = cla_model_config or self.cla_bound_config
        if CONTEXT_TAKES_MODEL_CONFIG:
            config = config or kwargs.get("model_config", args[0] if args else None)
        if sharing is None or config is None:
            raise ValueError(
                "CLADynamicInferenceContext needs the model's sharing and config: use "
                "CLADynamicInferenceContext.for_model(model, ...) or .bind(model)."
            )
        producers = local_producer_layers(config, sharing)
        if CONTEXT_TAKES_MODEL_CONFIG:
            args, kwargs = _with_model_config(args, kwargs, config, len(producers))
        else:
            kwargs["num_layers"] = len(producers)
        super().__init__(*args, **kwargs)
        if self.num_attention_layers != len(producers) or self.is_hybrid_model:
            raise ValueError(
                f"CLA paged cache: expected {len(producers)} K/V slots, Megatron sized "
                f"{self.num_attention_layers} (hybrid/Mamba models are not supported)."
            )
        self.layer_map = {local - 1: slot for slot, local in enumerate(producers)}
        self.cla_sharing = sharing
        self.cla_producer_local_layers = producers

    @classmethod
    def bind(cls, model: Any) -> type:
        """A subclass with ``model``'s sharing and config bound, for code that builds the
        context itself (e.g. Megatron's ``StaticInferenceEngine``)."""
        sharing, config = model_sharing(model)
        attrs = {"cla_bound_sharing": sharing, "cla_bound_config": config}
        return type(cls.__name__, (cls,), attrs)

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
        """
        sharing, config = model_sharing(model)
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
            from megatron.core.inference.config import InferenceConfig

            inference_config = InferenceConfig(**settings)
            return cls(config, inference_config, cla_sharing=sharing)
        return cls(
            params_dtype=config.params_dtype,
            kv_channels=config.kv_channels,
            num_attention_heads=_kv_heads_for_cache(config),
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            cla_sharing=sharing,
            cla_model_config=config,
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
