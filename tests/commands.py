"""Run ``megatron-cla`` commands as a user would: a child process with a controlled environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CALLER_OUTPUT_SETTINGS = (
    "PYTHONWARNINGS",
    "TORCH_LOGS",
    "TRANSFORMERS_VERBOSITY",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)
"""Settings of the caller's environment that change what a command prints; a spawned command
starts without them, so its output is the same whoever runs the tests."""


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a spawned command: the caller's less ``CALLER_OUTPUT_SETTINGS``."""
    env = {k: v for k, v in os.environ.items() if k not in CALLER_OUTPUT_SETTINGS}
    env.update(extra)
    return env


def megatron_cla_argv(*args: Any, nproc: int = 1) -> list[str]:
    """``python -m megatron_cla ARGS``, under ``torchrun --nproc-per-node NPROC`` when > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "megatron_cla", *map(str, args)]


def run_command(
    *args: Any, nproc: int = 1, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``megatron-cla ARGS`` from the repository root; stdout and stderr captured."""
    return subprocess.run(
        megatron_cla_argv(*args, nproc=nproc),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=command_env(**(env or {})),
    )


def start_command(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """Start ``megatron-cla ARGS`` in the background, stdout and stderr merged unless
    ``kwargs`` say otherwise (they go to ``subprocess.Popen``)."""
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return subprocess.Popen(megatron_cla_argv(*args), env=command_env(), **{**options, **kwargs})
