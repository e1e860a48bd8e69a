"""Ready spec objects for an unmodified Megatron-LM ``pretrain_gpt.py``.

``pretrain_gpt.py --spec <module> <attr>`` imports ``<module>``, takes ``vars(module)[attr]`` and
hands the object to ``GPTModel`` without calling it (a function fails with "specialize for
function."), before pipeline ranks are known. So the attributes below are single-layer
``ModuleSpec`` objects that Megatron replicates for every layer. Each ``CLATransformerLayer`` then

* decides producer/consumer from its global layer number, and
* builds its submodules from the run's config, so ``--qk-layernorm``, ``--normalization``,
  ``--qk-l2-norm``, ``--num-experts`` and ``--moe-grouped-gemm`` keep working.

Pick S without touching Megatron-LM::

    --spec megatron_cla.pretrain_gpt_spec cla2_te        # CLA2, Transformer Engine backend
    --spec megatron_cla.pretrain_gpt_spec cla3_local     # CLA3, Megatron-Core-only modules

    export MEGATRON_CLA_SHARE_FACTOR=4                   # any S ...
    export MEGATRON_CLA_PRODUCER_LAYERS=1,2,4,6,8        # ... or any producer pattern
    --spec megatron_cla.pretrain_gpt_spec cla_te         # (or cla_local) reads the variables

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

from megatron_cla.layer import CLATransformerLayer, CLATransformerLayerSubmodules
from megatron_cla.specs import (
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
    params: dict[str, Any] = {
        "cla_submodules_factory": partial(
            submodules_from_config, use_transformer_engine=use_transformer_engine
        )
    }
    if share_factor is None:
        params["cla_settings_from_env"] = True
    else:
        params["cla_share_factor"] = share_factor
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
