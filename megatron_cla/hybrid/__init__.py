"""Cross-layer attention in Megatron-Core's ``HybridModel`` (attention/MLP/MoE/Mamba stacks).

* :mod:`~megatron_cla.hybrid_layout` (core, re-exported here as ``HybridLayout``): the pattern,
  how CLA counts its attention layers, pipeline segments and their validation (pure Python).
* :mod:`~megatron_cla.hybrid.stack`: ``CLAHybridStack``, the stack that threads the K/V hand-off
  through every slot.
* :mod:`~megatron_cla.hybrid.specs`: ``get_cla_hybrid_stack_spec`` and Bridge-style callables.

Needs a megatron-core with ``HybridModel`` (0.19 or newer).
"""

from megatron_cla._compat import require_hybrid_model

require_hybrid_model("megatron_cla.hybrid")

from megatron_cla.hybrid.specs import (  # noqa: E402
    cla_hybrid_stack_spec_local,
    cla_hybrid_stack_spec_te,
    get_cla_hybrid_stack_spec,
)
from megatron_cla.hybrid.stack import CLAHybridStack, CLAHybridStackSubmodules  # noqa: E402
from megatron_cla.hybrid_layout import HybridLayout  # noqa: E402

__all__ = [
    "CLAHybridStack",
    "CLAHybridStackSubmodules",
    "HybridLayout",
    "cla_hybrid_stack_spec_local",
    "cla_hybrid_stack_spec_te",
    "get_cla_hybrid_stack_spec",
]
