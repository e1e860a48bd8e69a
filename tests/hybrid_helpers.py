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
    Inference keeps ``h`` where Megatron keeps Mamba states: per sequence in
    ``key_value_memory_dict[layer_number]`` (static batching), and in the SSM-state slot of each
    request of the dynamic context (``mamba_states_cache``, ``mamba_metadata``; decode tokens
    first, then the prefill tokens of each request, slots zeroed when a request starts).
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

    @staticmethod
    def _scan(a: torch.Tensor, value: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """States after each step of ``[t, ...]`` inputs, starting from ``state``."""
        outputs = []
        for t in range(value.shape[0]):
            state = a[t] * state + (1 - a[t]) * value[t]
            outputs.append(state)
        return torch.stack(outputs)

    def _static(self, a: torch.Tensor, value: torch.Tensor, ctx: Any) -> torch.Tensor:
        states = ctx.key_value_memory_dict
        if ctx.sequence_len_offset == 0 or self.layer_number not in states:
            states[self.layer_number] = value.new_zeros(value.shape[1:])
        out = self._scan(a, value, states[self.layer_number])
        states[self.layer_number] = out[-1]
        return out

    def _dynamic(self, a: torch.Tensor, value: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Packed tokens ``[tokens, 1, inner]``: decode requests first, one token each."""
        _, ssm = ctx.mamba_states_cache(self.layer_number - self.pp_layer_offset)
        meta, dims = ctx.mamba_metadata, ctx.padded_batch_dimensions
        out = torch.zeros_like(value)
        spans = []
        if dims.decode_req_count:
            spans += [(i, i + 1, int(s)) for i, s in enumerate(meta.batch_indices_decode.tolist())]
        if dims.prefill_req_count:
            cu, start = meta.cu_seqlens.tolist(), dims.decode_req_count
            for r, slot in enumerate(meta.batch_indices_prefill.tolist()):
                spans.append((start + cu[r], start + cu[r + 1], int(slot)))
        for begin, end, slot in spans:
            if slot < 0 or begin == end:  # padding
                continue
            states = self._scan(a[begin:end, 0], value[begin:end, 0], ssm[slot])
            out[begin:end, 0] = states
            ssm[slot] = states[-1]
        return out

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
        ctx = inference_context
        if ctx is None:
            states = self._scan(a, value, value.new_zeros(value.shape[1:]))
        elif ctx.is_static_batching():
            states = self._static(a, value, ctx)
        else:
            states = self._dynamic(a, value, ctx)
        out, _ = self.out_proj(F.silu(gate) * states)
        return hidden_states + out

    def mamba_state_shapes_per_request(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Megatron sizes each request's Mamba state slot from this (conv, SSM) pair."""
        return (1, 1), (self.value_proj.output_size_per_partition,)


STAND_IN_MAMBA = ModuleSpec(module=StandInMixerLayer)
"""The ``mamba_layer`` spec of the CPU test stacks."""


def with_stand_in_mixer(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` (a hybrid stack spec, or one that builds its submodules from the config) with
    the CPU stand-in in its ``M`` slot."""
    if spec.submodules is None:  # pretrain_hybrid_spec: submodules made at build time
        factory = spec.params["cla_submodules_factory"]

        def stand_in_factory(config: Any) -> Any:
            return dataclasses.replace(factory(config), mamba_layer=STAND_IN_MAMBA)

        return dataclasses.replace(
            spec, params={**spec.params, "cla_submodules_factory": stand_in_factory}
        )
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
