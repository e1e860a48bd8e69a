"""The frozen teacher of a distillation run (``uptrain.teacher``).

:func:`plan_teacher` reads the teacher run's saved config and checks it against the student
(vocabulary, layer shapes) before any weight is read, :func:`check_teacher_tokenizer` compares the
two tokenizers' fingerprints, and :func:`load_teacher` builds the teacher in the student's
tensor/context-parallel layout and precision, loads its weights and freezes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_cla.training.config import PretrainConfig

__all__ = ["TeacherPlan", "plan_teacher", "check_teacher_tokenizer", "load_teacher"]

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
    try:
        vocab = resumed_vocab_size(saved_vocab, cfg.parallel.tensor)
        plan = make_plan(teacher, world_size)
    except ValueError as err:  # e.g. its K/V heads do not split over the student's TP
        raise ValueError(f"uptrain.teacher={source} in the student's layout: {err}") from err
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
