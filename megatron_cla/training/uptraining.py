"""Continued training of a converted model: its settings and which parameters train.

* :func:`check_uptrain_settings` validates ``uptrain.*`` against the rest of the config (called by
  :func:`~megatron_cla.training.plan.make_plan`, before anything is allocated).
* :func:`freeze_outside_attention` implements ``uptrain.trainable: attention``: every parameter
  outside the attention blocks stops requiring gradients, so Megatron's DDP gives it no gradient
  buffer and its optimizer leaves it out.

The frozen teacher of a distillation run is :mod:`megatron_cla.training.teacher`.
"""

from __future__ import annotations

import torch

from megatron_cla.training.config import PretrainConfig

__all__ = [
    "TRAINABLE",
    "check_uptrain_settings",
    "is_attention_parameter",
    "freeze_outside_attention",
]

TRAINABLE = ("all", "attention")
"""The values of ``uptrain.trainable``."""


def check_uptrain_settings(cfg: PretrainConfig) -> None:
    """``ValueError`` for an invalid ``uptrain`` section, naming the values and the fix."""
    u, p = cfg.uptrain, cfg.parallel
    if u.trainable not in TRAINABLE:
        raise ValueError(f"uptrain.trainable={u.trainable!r}: use one of {list(TRAINABLE)}")
    if not 0.0 <= u.kd_weight <= 1.0:
        raise ValueError(f"uptrain.kd_weight={u.kd_weight} must be in [0, 1]")
    if not u.kd_temperature > 0.0:
        raise ValueError(f"uptrain.kd_temperature={u.kd_temperature} must be > 0")
    if u.trainable == "attention":
        _check_attention_to_train(cfg)
    if u.teacher is not None and (p.pipeline > 1 or p.virtual_pipeline is not None):
        raise ValueError(
            f"uptrain.teacher with parallel.pipeline={p.pipeline} (virtual "
            f"{p.virtual_pipeline}): the teacher runs beside the student on every rank, which "
            f"needs parallel.pipeline=1; spread the model with parallel.tensor (and data "
            f"parallelism) instead"
        )


def _check_attention_to_train(cfg: PretrainConfig) -> None:
    m = cfg.model
    if m.arch != "hybrid" or m.hybrid_layer_pattern is None:
        return
    segments = m.hybrid_layer_pattern.split("|")
    empty = [i for i, segment in enumerate(segments) if "*" not in segment]
    if len(empty) == len(segments):
        raise ValueError(
            f"uptrain.trainable=attention: model.hybrid_layer_pattern="
            f"{m.hybrid_layer_pattern!r} has no attention layer ('*'), so nothing would train; "
            f"use uptrain.trainable=all"
        )
    if empty:
        raise ValueError(
            f"uptrain.trainable=attention: pipeline segment(s) {empty} of "
            f"model.hybrid_layer_pattern={m.hybrid_layer_pattern!r} hold no attention layer, "
            f"so their ranks would have nothing to train; move a '*' into each segment or use "
            f"uptrain.trainable=all"
        )


def is_attention_parameter(name: str) -> bool:
    """Whether a parameter name (as ``named_parameters`` gives it) belongs to an attention
    block: the projections, biases and q/k norms under ``self_attention``. The input norm that
    Transformer Engine fuses into ``linear_qkv`` (``layer_norm_weight``) is not attention, so both
    backends train the same set."""
    return ".self_attention." in f".{name}" and ".layer_norm_" not in name


def freeze_outside_attention(module: torch.nn.Module) -> int:
    """Stop every parameter outside the attention blocks from requiring gradients (before DDP
    wraps ``module``); returns how many elements still train."""
    trainable = 0
    for name, param in module.named_parameters():
        param.requires_grad_(is_attention_parameter(name))
        trainable += param.numel() if param.requires_grad else 0
    return trainable
