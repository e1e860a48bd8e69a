"""CLA in Megatron-Core's inference stack: caches that hold K/V for producer layers only.

* Static batching (``StaticInferenceContext``): producers allocate their cache lazily as usual;
  consumers never allocate and attend over their producer's cached K/V (handed over in the
  layer's ``context``), so the cache holds ``#producers`` layers.
* Dynamic batching (paged): :class:`CLADynamicInferenceContext` sizes the paged buffer for the
  producers; consumers read their producer's slot.
"""

from megatron_cla.inference.context import (
    CLADynamicInferenceContext,
    local_producer_layers,
    model_sharing,
)
from megatron_cla.inference.paged_attention import PagedAttentionOnCPU, paged_attention

__all__ = [
    "CLADynamicInferenceContext",
    "PagedAttentionOnCPU",
    "local_producer_layers",
    "model_sharing",
    "paged_attention",
]
