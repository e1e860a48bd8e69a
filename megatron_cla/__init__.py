"""Cross-Layer Attention (CLA) for Megatron-Core.

In every group of S adjacent decoder layers only the first (the producer) computes keys and values;
the others (consumers) compute queries only and attend over the producer's K/V, so the KV cache
shrinks by S. See README.md for usage.

The package root is the library core: the sharing, the K/V hand-off, the attention and layer
classes, their config, validation and specs for ``GPTModel`` (the names below), plus the names
Megatron-LM's ``--spec`` takes (:mod:`megatron_cla.pretrain_gpt_spec`,
:mod:`megatron_cla.pretrain_hybrid_spec`). Each area has its folder: ``HybridModel`` stacks in
:mod:`megatron_cla.hybrid` (megatron-core 0.19+), Megatron-Core inference in
:mod:`megatron_cla.inference`, the launcher's runs in :mod:`megatron_cla.training`, Hugging Face and
vLLM in :mod:`megatron_cla.serving`; the ``megatron-cla`` command lives in :mod:`megatron_cla.cli`
(README: "Package layout"). Every name below is imported on first use, so ``import megatron_cla``
does not import Megatron-Core (the command configures logging before Megatron's import-time
notices).
"""

from megatron_cla._lazy import lazy_names

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
}
"""Public name -> the core module that defines it."""

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
