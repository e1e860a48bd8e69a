"""Cross-Layer Attention (CLA) for Megatron-Core.

In every group of S adjacent decoder layers only the first (the producer) computes keys and values;
the others (consumers) compute queries only and attend over the producer's K/V, so the KV cache
shrinks by S. See README.md for usage.

``GPTModel``: the specs below. ``HybridModel`` (megatron-core 0.19+): ``get_cla_hybrid_stack_spec``
and the rest of :mod:`megatron_cla.hybrid`, imported on first use.
"""

from typing import Any

from megatron_cla.attention import (
    CLAConsumerAttention,
    CLAConsumerAttentionSubmodules,
    CLAProducerAttention,
)
from megatron_cla.config import CLATransformerConfig
from megatron_cla.layer import CLATransformerLayer, CLATransformerLayerSubmodules
from megatron_cla.sharing import KVSharing
from megatron_cla.specs import (
    cla_block_spec_local,
    cla_block_spec_te,
    cla_layer_spec_from_stock,
    get_cla_decoder_block_spec,
    get_cla_decoder_layer_specs,
    get_gpt_layer_with_cla_local_spec,
    get_gpt_layer_with_cla_transformer_engine_spec,
)

__version__ = "0.1.0"

_HYBRID_EXPORTS = (
    "CLAHybridStack",
    "get_cla_hybrid_stack_spec",
    "cla_hybrid_stack_spec_local",
    "cla_hybrid_stack_spec_te",
)


def __getattr__(name: str) -> Any:
    """HybridModel support is imported on first use (older megatron-core has no HybridModel)."""
    if name in _HYBRID_EXPORTS:
        from megatron_cla import hybrid

        return getattr(hybrid, name)
    raise AttributeError(f"module 'megatron_cla' has no attribute {name!r}")


__all__ = [
    "CLAConsumerAttention",
    "CLAConsumerAttentionSubmodules",
    "CLAProducerAttention",
    "CLATransformerConfig",
    "CLATransformerLayer",
    "CLATransformerLayerSubmodules",
    "CLAHybridStack",
    "KVSharing",
    "cla_block_spec_local",
    "cla_block_spec_te",
    "cla_layer_spec_from_stock",
    "get_cla_decoder_block_spec",
    "get_cla_decoder_layer_specs",
    "get_cla_hybrid_stack_spec",
    "cla_hybrid_stack_spec_local",
    "cla_hybrid_stack_spec_te",
    "get_gpt_layer_with_cla_local_spec",
    "get_gpt_layer_with_cla_transformer_engine_spec",
]
