"""Cross-Layer Attention (CLA) for Megatron-Core.

In every group of S adjacent decoder layers only the first (the producer) computes keys and values;
the others (consumers) compute queries only and attend over the producer's K/V, so the KV cache
shrinks by S. See README.md for usage.

``GPTModel``: the layer and block specs below. ``HybridModel`` (megatron-core 0.19+):
``get_cla_hybrid_stack_spec`` and the rest of :mod:`megatron_cla.hybrid`. Every name is imported
on first use, so ``import megatron_cla`` does not import Megatron-Core (the command-line tools
configure logging before Megatron's import-time notices).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CLAConsumerAttention": "megatron_cla.attention",
    "CLAConsumerAttentionSubmodules": "megatron_cla.attention",
    "CLAProducerAttention": "megatron_cla.attention",
    "CLATransformerConfig": "megatron_cla.config",
    "CLATransformerLayer": "megatron_cla.layer",
    "CLATransformerLayerSubmodules": "megatron_cla.layer",
    "KVSharing": "megatron_cla.sharing",
    "cla_block_spec_local": "megatron_cla.specs",
    "cla_block_spec_te": "megatron_cla.specs",
    "cla_layer_spec_from_stock": "megatron_cla.specs",
    "get_cla_decoder_block_spec": "megatron_cla.specs",
    "get_cla_decoder_layer_specs": "megatron_cla.specs",
    "get_gpt_layer_with_cla_local_spec": "megatron_cla.specs",
    "get_gpt_layer_with_cla_transformer_engine_spec": "megatron_cla.specs",
    "CLAHybridStack": "megatron_cla.hybrid",
    "get_cla_hybrid_stack_spec": "megatron_cla.hybrid",
    "cla_hybrid_stack_spec_local": "megatron_cla.hybrid",
    "cla_hybrid_stack_spec_te": "megatron_cla.hybrid",
}
"""Public name -> the module that defines it (HybridModel names need megatron-core 0.19+)."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_cla' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
