"""A torch LayerNorm/RMSNorm that Megatron can use under sequence parallelism, for CPU tests.

Megatron's local backend norm without Apex (``WrappedTorchNorm``) refuses
``sequence_parallel=True``; Apex's ``FusedLayerNorm`` and TE's ``TENorm`` accept it because all a
sequence-parallel norm needs is to mark its parameters ``sequence_parallel`` so that Megatron's
``finalize_model_grads`` all-reduces their gradients over the tensor-parallel group. This module
does the same for the plain torch norms, so SP can be exercised where neither Apex nor TE exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["SequenceParallelTorchNorm", "with_norm"]


class SequenceParallelTorchNorm:
    """Factory with ``WrappedTorchNorm``'s signature returning a torch norm usable with SP."""

    def __new__(  # noqa: D102
        cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any
    ) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        norm = norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def with_norm(block_spec: Any, norm: Any = SequenceParallelTorchNorm) -> Any:
    """A copy of a ``TransformerBlockSubmodules`` whose layer and final norms are ``norm``."""
    layers = []
    for spec in block_spec.layer_specs:
        sub = dataclasses.replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
        layers.append(dataclasses.replace(spec, submodules=sub))
    return dataclasses.replace(block_spec, layer_specs=layers, layer_norm=norm)
