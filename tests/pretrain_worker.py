"""Launcher entry points for spawned ranks, and the tiny run used by the launcher tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_cla.training.config import load_config

TINY_RUN = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.seq_length=64",
    "model.cla_share_factor=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.warmup_iters=2",
    "logging.log_interval=4",
    "logging.eval_interval=8",
    "logging.eval_iters=2",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


HYBRID_RUN = (
    "model.arch=hybrid",
    "model.num_layers=null",
    "model.hybrid_layer_pattern=*-*-*-*-",
)
"""The tiny run as a HybridModel (the same layers spelled ``*-*-*-*-``); append to overrides."""


def tiny_overrides(run_dir: Path, data_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides for a tiny, fast CLA2 run writing to ``run_dir``."""
    return [
        *TINY_RUN,
        f"train.train_iters={steps}",
        f"logging.run_dir={run_dir}",
        f"data.dir={data_dir}",
        *extra,
    ]


def pretrain_on_rank(overrides: list[str]) -> Any:
    """``megatron-cla pretrain`` in a spawned rank (run_on_ranks)."""
    from megatron_cla.training.pretraining import run_pretraining

    return run_pretraining(load_config(None, overrides))


def pretrain_file_on_rank(path: str, overrides: list[str]) -> Any:
    """``megatron-cla pretrain --config PATH OVERRIDES`` in a spawned rank."""
    from megatron_cla.training.pretraining import run_pretraining

    return run_pretraining(load_config(Path(path), overrides))


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (later entries win: a resumed run rewrites)."""
    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    return losses
