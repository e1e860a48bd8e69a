"""Ready ``hybrid_stack_spec`` objects for an unmodified Megatron-LM ``pretrain_hybrid.py``.

``pretrain_hybrid.py --spec <module> <attr>`` imports ``<module>`` and hands ``vars(module)[attr]``
to ``HybridModel`` as its ``hybrid_stack_spec``, without calling it. The attributes below are
``ModuleSpec`` objects of :class:`~megatron_cla.hybrid.stack.CLAHybridStack` that build their
submodules from the run's config when the model is built, so ``--qk-layernorm``,
``--normalization`` and ``--moe-grouped-gemm`` keep working. The stack reads the pattern from
``--hybrid-layer-pattern`` (Megatron-LM's parsed arguments), and S counts attention layers: with
``--hybrid-layer-pattern "*-*-M*-*-"`` and ``cla2_te`` the 1st and 3rd ``*`` produce K/V and the 2nd
and 4th consume them::

    --spec megatron_cla.pretrain_hybrid_spec cla2_te        # CLA2, Transformer Engine backend
    --spec megatron_cla.pretrain_hybrid_spec cla3_local     # CLA3, Megatron-Core-only modules

    export MEGATRON_CLA_SHARE_FACTOR=4                      # any S ...
    export MEGATRON_CLA_PRODUCER_LAYERS=1,2,4,6             # ... or producer attention layers
    --spec megatron_cla.pretrain_hybrid_spec cla_te         # (or cla_local) reads the variables

With pipeline parallelism mark the stages with ``|`` in the pattern; a segment whose first attention
layer would be a consumer is rejected with a pattern that works. Mamba (``M``) and GDN (``G``) slots
need Transformer Engine and their CUDA kernels, as with Megatron's own spec.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_cla.hybrid.specs import hybrid_submodules_from_config
from megatron_cla.hybrid.stack import CLAHybridStack
from megatron_cla.layer import fixed_or_env_sharing

__all__ = [
    "cla_local",
    "cla_te",
    "cla2_local",
    "cla3_local",
    "cla2_te",
    "cla3_te",
    "stack_spec_for_pretrain_hybrid",
]


def stack_spec_for_pretrain_hybrid(
    use_transformer_engine: bool, share_factor: Optional[int] = None
) -> ModuleSpec:
    """A CLA hybrid stack spec built from the run's config; S fixed, or from the environment."""
    factory = partial(hybrid_submodules_from_config, use_transformer_engine=use_transformer_engine)
    params = {"cla_submodules_factory": factory, **fixed_or_env_sharing(share_factor)}
    return ModuleSpec(module=CLAHybridStack, params=params)


cla_local = stack_spec_for_pretrain_hybrid(False)
"""Local backend; sharing from MEGATRON_CLA_SHARE_FACTOR / MEGATRON_CLA_PRODUCER_LAYERS."""
cla_te = stack_spec_for_pretrain_hybrid(True)
"""Transformer Engine backend; sharing from the environment variables."""
cla2_local = stack_spec_for_pretrain_hybrid(False, 2)
cla3_local = stack_spec_for_pretrain_hybrid(False, 3)
cla2_te = stack_spec_for_pretrain_hybrid(True, 2)
cla3_te = stack_spec_for_pretrain_hybrid(True, 3)
