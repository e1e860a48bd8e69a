"""Ready spec objects for an unmodified Megatron-LM ``pretrain_gpt.py``.

``pretrain_gpt.py --spec <module> <attr>`` imports ``<module>`` and takes ``vars(module)[attr]``.
What it does with it depends on the release:

* a ``ModuleSpec`` is handed to ``GPTModel`` as is, on every release. The ``cla*_local`` /
  ``cla*_te`` attributes below are single-layer ``ModuleSpec`` objects that Megatron replicates for
  every layer of the stage;
* a callable is *called* since megatron-core 0.19 (``GPTModelBuilder`` passes its
  ``GPTModelConfig`` and ``vp_stage=``); 0.16's ``gpt_builder`` never calls it and fails with
  "specialize for function.". The ``cla*_block_local`` / ``cla*_block_te`` attributes are such
  callables: they return the stage's whole CLA block spec, so they also honour
  ``--moe-layer-freq`` patterns of mixed dense and MoE layers.

Each ``CLATransformerLayer`` of a replicated layer spec

* decides producer/consumer from its global layer number, and
* builds its submodules from the run's config, so ``--qk-layernorm``, ``--normalization``,
  ``--qk-l2-norm``, ``--num-experts`` and ``--moe-grouped-gemm`` keep working.

Pick S without touching Megatron-LM::

    --spec megatron_cla.pretrain_gpt_spec cla2_te        # CLA2, Transformer Engine backend
    --spec megatron_cla.pretrain_gpt_spec cla3_local     # CLA3, Megatron-Core-only modules
    --spec megatron_cla.pretrain_gpt_spec cla2_block_te  # 0.19+: block spec (mixed MoE layers)

    export MEGATRON_CLA_SHARE_FACTOR=4                   # any S ...
    export MEGATRON_CLA_PRODUCER_LAYERS=1,2,4,6,8        # ... or any producer pattern
    --spec megatron_cla.pretrain_gpt_spec cla_te         # (or cla_local, cla_block_te, ...)

The model needs ``megatron_cla`` importable (``pip install megatron-cla`` in the same
environment). Pipeline splits are validated when the first layer is built; a stage that would
start on a consumer is rejected with a ``--pipeline-model-parallel-layout`` that works.
Note that Megatron-LM's ``--attention-backend local`` asserts ``--spec local``: use the default
attention backend with these specs.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_cla.layer import (
    CLATransformerLayer,
    CLATransformerLayerSubmodules,
    fixed_or_env_sharing,
)
from megatron_cla.specs import (
    get_cla_decoder_block_spec,
    get_gpt_layer_with_cla_local_spec,
    get_gpt_layer_with_cla_transformer_engine_spec,
)

__all__ = [
    "cla_local",
    "cla_te",
    "cla2_local",
    "cla3_local",
    "cla4_local",
    "cla2_te",
    "cla3_te",
    "cla4_te",
    "cla_block_local",
    "cla_block_te",
    "cla2_block_local",
    "cla3_block_local",
    "cla2_block_te",
    "cla3_block_te",
    "block_spec_for_pretrain_gpt",
    "layer_spec_for_pretrain_gpt",
]


def _uniform_moe(config: Any) -> None:
    freq = getattr(config, "moe_layer_freq", 1)
    if config.num_moe_experts and not (freq == 1 or (isinstance(freq, list) and all(freq))):
        raise ValueError(
            f"--spec replicates one layer spec, so --moe-layer-freq={freq!r} (mixed dense/MoE "
            f"layers) cannot be honoured. Use megatron_cla.get_cla_decoder_block_spec from a "
            f"model builder (or Megatron-Bridge) for mixed layers."
        )


def submodules_from_config(
    config: Any, use_transformer_engine: bool
) -> CLATransformerLayerSubmodules:
    """The CLA layer submodules ``pretrain_gpt.py`` would pick for this config and backend."""
    _uniform_moe(config)
    common = dict(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        qk_l2_norm=config.qk_l2_norm,
    )
    if use_transformer_engine:
        spec = get_gpt_layer_with_cla_transformer_engine_spec(**common)
    else:
        spec = get_gpt_layer_with_cla_local_spec(normalization=config.normalization, **common)
    return spec.submodules


def layer_spec_for_pretrain_gpt(
    use_transformer_engine: bool, share_factor: Optional[int] = None
) -> ModuleSpec:
    """A replicable CLA layer spec; S fixed, or read from the environment when ``None``."""
    factory = partial(submodules_from_config, use_transformer_engine=use_transformer_engine)
    params = {"cla_submodules_factory": factory, **fixed_or_env_sharing(share_factor)}
    return ModuleSpec(module=CLATransformerLayer, params=params)


cla_local = layer_spec_for_pretrain_gpt(False)
"""Local backend; sharing from MEGATRON_CLA_SHARE_FACTOR / MEGATRON_CLA_PRODUCER_LAYERS."""
cla_te = layer_spec_for_pretrain_gpt(True)
"""Transformer Engine backend; sharing from the environment variables."""
cla2_local = layer_spec_for_pretrain_gpt(False, 2)
cla3_local = layer_spec_for_pretrain_gpt(False, 3)
cla4_local = layer_spec_for_pretrain_gpt(False, 4)
cla2_te = layer_spec_for_pretrain_gpt(True, 2)
cla3_te = layer_spec_for_pretrain_gpt(True, 3)
cla4_te = layer_spec_for_pretrain_gpt(True, 4)


def block_spec_for_pretrain_gpt(
    model_config: Any,
    vp_stage: Optional[int] = None,
    *,
    use_transformer_engine: bool,
    share_factor: Optional[int] = None,
) -> Any:
    """The CLA block spec of one stage for the ``GPTModelConfig`` (or ``TransformerConfig``)
    ``pretrain_gpt.py`` passes; S fixed, or read from the environment when ``None``."""
    config = getattr(model_config, "transformer", model_config)  # GPTModelConfig wraps it
    return get_cla_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        vp_stage=vp_stage,
        **fixed_or_env_sharing(share_factor),
    )


cla_block_local = partial(block_spec_for_pretrain_gpt, use_transformer_engine=False)
"""0.19+ callable, local backend; sharing from the environment variables."""
cla_block_te = partial(block_spec_for_pretrain_gpt, use_transformer_engine=True)
"""0.19+ callable, Transformer Engine backend; sharing from the environment variables."""
cla2_block_local = partial(cla_block_local, share_factor=2)
cla3_block_local = partial(cla_block_local, share_factor=3)
cla2_block_te = partial(cla_block_te, share_factor=2)
cla3_block_te = partial(cla_block_te, share_factor=3)
