"""Tiny HybridModels for the tests, and a CPU stand-in for the Mamba-2 slot.

**The stand-in is not Mamba.** Megatron's Mamba-2 and Gated DeltaNet layers need CUDA kernels
(``mamba_ssm``, ``causal_conv1d``, flash-linear-attention), so on a CPU the ``M`` slot of the test
stacks holds :class:`StandInMixerLayer`: a small gated linear recurrence with the interface and
placement of Megatron's ``MambaLayer`` (not a ``TransformerLayer``, built with ``pp_layer_offset``,
``[s, b, h]`` in and out, tensor- and sequence-parallel projections, state carried over the
sequence). It exists to test the plumbing around such slots: the K/V hand-off must cross them in
every path, recompute chunks may start on them, pipeline segments and checkpoints must hold them.
Real Mamba-2 hybrids run in ``tests/test_gpu_te.py`` where the kernels exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_cla import CLATransformerConfig
from megatron_cla._compat import hybrid_model_available
from megatron_cla.testing import device
from megatron_cla.testing.norms import SequenceParallelTorchNorm
from tests.helpers import SEQ, TINY_SETTINGS, VOCAB

requires_hybrid = pytest.mark.skipif(
    not hybrid_model_available(),
    reason="HybridModel does not exist in this megatron-core (it needs 0.19 or newer)",
)
"""Mark for every HybridModel test (megatron-core 0.16.1 has no HybridModel)."""

INNER = 32
"""Width of the stand-in's recurrence."""


class StandInMixerLayer(MegatronModule):
    """CPU stand-in for Megatron's ``MambaLayer`` (see the module docstring; not Mamba).

    ``y = x + W_out (silu(W_g n) * h)`` with ``n = norm(x)`` and the causal recurrence
    ``h_t = a_t * h_{t-1} + (1 - a_t) * (W_v n)_t``, ``a_t = sigmoid((W_a n)_t)``, per channel.
    Static inference keeps ``h`` per sequence in ``key_value_memory_dict[layer_number]``, as
    Megatron's Mamba layer keeps its states there.
    """

    def __init__(
        self,
        config: Any,
        submodules: Any = None,
        layer_number: int = 1,
        pg_collection: Any = None,
        pp_layer_offset: int = 0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.norm = SequenceParallelTorchNorm(config, config.hidden_size, config.layernorm_epsilon)
        column = dict(
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            tp_group=pg_collection.tp,
        )
        self.gate_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, INNER, **column)
        self.value_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, INNER, **column)
        self.decay_proj = tensor_parallel.ColumnParallelLinear(config.hidden_size, INNER, **column)
        self.out_proj = tensor_parallel.RowParallelLinear(
            INNER,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=pg_collection.tp,
        )

    def _state(self, ctx: Any, batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
        if ctx is None:
            return like.new_zeros(batch, width)
        if not ctx.is_static_batching():
            raise NotImplementedError("the CPU stand-in mixer has no paged (dynamic) state")
        if ctx.sequence_len_offset == 0 or self.layer_number not in ctx.key_value_memory_dict:
            ctx.key_value_memory_dict[self.layer_number] = like.new_zeros(batch, width)
        return ctx.key_value_memory_dict[self.layer_number]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any = None,
        inference_context: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        n = self.norm(hidden_states)
        gate, _ = self.gate_proj(n)
        value, _ = self.value_proj(n)
        decay, _ = self.decay_proj(n)
        a = torch.sigmoid(decay)
        state = self._state(inference_context, value.shape[1], value.shape[2], value)
        outputs = []
        for t in range(value.shape[0]):
            state = a[t] * state + (1 - a[t]) * value[t]
            outputs.append(state)
        if inference_context is not None:
            inference_context.key_value_memory_dict[self.layer_number] = state
        mixed = F.silu(gate) * torch.stack(outputs)
        out, _ = self.out_proj(mixed)
        return hidden_states + out

    def mamba_state_shapes_per_request(self) -> tuple[tuple[int], tuple[int]]:
        """Megatron asks Mamba-slot layers for their per-request state shapes."""
        return (INNER, 1), (INNER,)


STAND_IN_MAMBA = ModuleSpec(module=StandInMixerLayer)
"""The ``mamba_layer`` spec of the CPU test stacks."""


def with_stand_in_mixer(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` (a hybrid stack spec) with the CPU stand-in in its ``M`` slot."""
    submodules = dataclasses.replace(spec.submodules, mamba_layer=STAND_IN_MAMBA)
    return dataclasses.replace(spec, submodules=submodules)


def with_hybrid_norm(spec: ModuleSpec, norm: Any = SequenceParallelTorchNorm) -> ModuleSpec:
    """A copy of a hybrid stack spec whose layer and final norms are ``norm`` (for SP on CPU)."""
    sub = spec.submodules

    def renorm(layer: ModuleSpec, field: str) -> ModuleSpec:
        return dataclasses.replace(
            layer, submodules=dataclasses.replace(layer.submodules, **{field: norm})
        )

    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            sub,
            attention_layer=renorm(sub.attention_layer, "input_layernorm"),
            mlp_layer=renorm(sub.mlp_layer, "pre_mlp_layernorm"),
            moe_layer=renorm(sub.moe_layer, "pre_mlp_layernorm"),
            final_norm=norm,
        ),
    )


def pattern_length(pattern: str) -> int:
    """Layers of a hybrid pattern (``|`` separators do not count)."""
    return len(pattern.replace("|", ""))


def tiny_hybrid_config(pattern: str, **overrides: Any) -> CLATransformerConfig:
    """The tiny test model as a hybrid stack of ``pattern`` (hidden 64, MQA by default)."""
    settings = {**TINY_SETTINGS, "num_layers": pattern_length(pattern)}
    return CLATransformerConfig(**{**settings, "hybrid_layer_pattern": pattern, **overrides})


def build_hybrid(config: Any, spec: ModuleSpec, pattern: str, seed: int = 7, **kwargs: Any):
    """HybridModel with RoPE over ``pattern``; parameters drawn from ``seed``."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = HybridModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=pattern,
        position_embedding_type="rope",
        **kwargs,
    )
    return model.to(device())


def cla_hybrid_spec(**options: Any) -> ModuleSpec:
    """The local-backend CLA hybrid stack spec with the CPU stand-in in ``M`` slots."""
    from megatron_cla.hybrid import get_cla_hybrid_stack_spec

    return with_stand_in_mixer(get_cla_hybrid_stack_spec(use_transformer_engine=False, **options))


def build_cla_hybrid(config: Any, pattern: Optional[str] = None, seed: int = 7, **kwargs: Any):
    """HybridModel of ``config`` (its ``hybrid_layer_pattern`` unless ``pattern``) with the
    local CLA hybrid spec."""
    pattern = pattern or config.hybrid_layer_pattern
    return build_hybrid(config, cla_hybrid_spec(), pattern, seed=seed, **kwargs)
