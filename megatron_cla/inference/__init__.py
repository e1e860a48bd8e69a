"""CLA in Megatron-Core's inference stack: caches that hold K/V for producer layers only.

* Static batching (``StaticInferenceContext``): producers allocate their cache lazily as usual;
  consumers never allocate and attend over their producer's cached K/V (handed over in the
  layer's ``context``), so the cache holds ``#producers`` layers.
* Dynamic batching (paged): :class:`CLADynamicInferenceContext` sizes the paged buffer for the
  producers; consumers read their producer's slot (:mod:`megatron_cla.inference.context`).
* :mod:`~megatron_cla.inference.engines`: Megatron's engines built with those caches;
  :mod:`~megatron_cla.inference.generation`: a launcher checkpoint served by the dynamic engine
  (``megatron-cla generate``); :mod:`~megatron_cla.inference.budget`: the paged cache's size and
  concurrency on a GPU (``megatron-cla kv-budget``).

Names are imported on first use, so importing a submodule does not import Megatron-Core.
"""

from megatron_cla._lazy import lazy_names

_EXPORTS = {
    "CLADynamicInferenceContext": "megatron_cla.inference.context",
    "local_producer_layers": "megatron_cla.inference.context",
    "model_sharing": "megatron_cla.inference.context",
    "PagedAttentionOnCPU": "megatron_cla.paged_attention",
    "paged_attention": "megatron_cla.paged_attention",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
