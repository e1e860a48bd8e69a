"""Continued training of a converted model: which parameters train, and the frozen teacher.

* :func:`check_uptrain_settings` validates ``uptrain.*`` against the rest of the config (called by
  :func:`~megatron_cla.training.plan.make_plan`, before anything is allocated).
* :func:`freeze_outside_attention` implements ``uptrain.trainable: attention``: every parameter
  outside the attention blocks stops requiring gradients, so Megatron's DDP gives it no gradient
  buffer and its optimizer leaves it out.
* :func:`plan_teacher` reads the teacher run's saved config and checks it against the student
  (vocabulary, layer shapes, tokenizer) before any weight is read; :func:`load_teacher` then
  builds it in the student's tensor/context-parallel layout, loads its weights and freezes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_cla.training.config import PretrainConfig

__all__ = [
    "TRAINABLE",
    "TeacherPlan",
    "check_uptrain_settings",
    "is_attention_parameter",
    "freeze_outside_attention",
    "plan_teacher",
    "check_teacher_tokenizer",
    "load_teacher",
]

TRAINABLE = ("all", "attention")
"""The values of ``uptrain.trainable``."""

_SHAPE_FIELDS = (
    "arch",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "ffn_hidden_size",
    "swiglu",
    "normalization",
    "untie_embeddings",
)
"""Model fields a teacher must share with its student (the student was converted from it)."""


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


@dataclass
class TeacherPlan:
    """The teacher of a distillation run, checked against its student."""

    checkpointer: Any
    iteration: int
    config: PretrainConfig
    """The teacher's saved config laid out like the student (TP, CP, precision)."""
    plan: Any
    """Its ``RunPlan``."""
    padded_vocab: int

    def describe(self) -> str:
        """One line for the run's header."""
        sharing = self.plan.transformer.cla_sharing
        return f"teacher {self.checkpointer.path(self.iteration)} (CLA groups {sharing.describe()})"


def plan_teacher(cfg: PretrainConfig, world_size: int, student_vocab: int) -> TeacherPlan:
    """Read and check the teacher of ``cfg`` (``uptrain.teacher``); nothing is allocated."""
    from megatron_cla.training.model import resumed_vocab_size
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.run_dir import find_checkpoint
    from megatron_cla.training.weights import saved_run_config

    source = Path(cfg.uptrain.teacher)
    if not source.exists():
        raise ValueError(f"uptrain.teacher={source} does not exist; give the source model's run")
    checkpointer, iteration = find_checkpoint(source)
    teacher = _teacher_config(saved_run_config(checkpointer, iteration), cfg)
    _check_shapes(cfg, teacher, source)
    saved_vocab = checkpointer.saved_vocab_size(iteration)
    if saved_vocab != student_vocab:
        raise ValueError(
            f"uptrain.teacher={source} has {saved_vocab} vocabulary rows, the student "
            f"{student_vocab}: distillation compares the two models' logits token by token, so "
            f"both need the same tokenizer and vocabulary"
        )
    vocab = resumed_vocab_size(saved_vocab, cfg.parallel.tensor)
    plan = make_plan(teacher, world_size)
    return TeacherPlan(checkpointer, iteration, teacher, plan, vocab)


def _teacher_config(saved: PretrainConfig, student: PretrainConfig) -> PretrainConfig:
    """The teacher's own model, laid out and computed like the student; never trained."""
    return dataclasses.replace(
        saved,
        model=dataclasses.replace(saved.model, dropout=0.0),
        parallel=dataclasses.replace(student.parallel, distributed_optimizer=False),
        train=dataclasses.replace(
            student.train,
            fp8=None,
            recompute_granularity=None,
            recompute_method=None,
            recompute_num_layers=None,
        ),
        uptrain=dataclasses.replace(student.uptrain, teacher=None, trainable="all"),
    )


def _check_shapes(student: PretrainConfig, teacher: PretrainConfig, source: Path) -> None:
    s, t = student.model, teacher.model
    differ = [
        f"{name} {getattr(t, name)!r} vs {getattr(s, name)!r}"
        for name in _SHAPE_FIELDS
        if getattr(t, name) != getattr(s, name)
    ]
    if s.arch == "hybrid" and t.hybrid_layer_pattern != s.hybrid_layer_pattern:
        differ.append(
            f"hybrid_layer_pattern {t.hybrid_layer_pattern!r} vs {s.hybrid_layer_pattern!r}"
        )
    if t.seq_length < s.seq_length:
        differ.append(f"seq_length {t.seq_length} < {s.seq_length}")
    if differ:
        raise ValueError(
            f"uptrain.teacher={source} is not the model this student was converted from "
            f"(teacher vs student: {'; '.join(differ)}); give the run the student came from. "
            f"A CLA teacher is fine when these shapes match."
        )


def check_teacher_tokenizer(teacher: TeacherPlan, student_tokenizer: Path) -> None:
    """``ValueError`` when the teacher's tokenizer is another one than the student's data's."""
    from megatron_cla.data.tokenizer import tokenizer_fingerprint
    from megatron_cla.training.run_dir import run_tokenizer_path

    try:
        theirs = run_tokenizer_path(teacher.config)
    except FileNotFoundError as err:
        raise ValueError(f"uptrain.teacher: {err}") from err
    if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(student_tokenizer):
        raise ValueError(
            f"uptrain.teacher's tokenizer ({theirs}) is another one than the student's "
            f"({student_tokenizer}): the same ids would mean different text; give the run the "
            f"student was converted from"
        )


def load_teacher(teacher: TeacherPlan) -> torch.nn.Module:
    """Build the teacher in this rank's layout, load its weights and freeze it (eval mode, no
    gradients). Needs Megatron's parallel state."""
    from megatron_cla.training.model import build_model_chunk

    model = build_model_chunk(teacher.plan, teacher.padded_vocab)
    teacher.checkpointer.load_weights(teacher.iteration, [model])
    model.eval()
    model.requires_grad_(False)
    return model
