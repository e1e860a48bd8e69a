"""``megatron-cla <command> [options]``: list the commands, run one.

The console script ``megatron-cla`` and ``python -m megatron_cla`` both land here (so
``torchrun ... -m megatron_cla pretrain --config X`` works); a command's module is imported only
when it runs, so ``megatron-cla --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import Optional

from megatron_cla.cli.common import COMMANDS

__all__ = ["main", "overview"]


def overview() -> str:
    """What ``megatron-cla --help`` prints: usage and one line per command."""
    from megatron_cla import __version__

    width = max(len(c.name) for c in COMMANDS)
    lines = [
        "usage: megatron-cla <command> [options]",
        "",
        f"Cross-Layer Attention (CLA) for Megatron-Core, version {__version__}.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS),
        "",
        "'megatron-cla <command> --help' shows a command's options.",
        "'python -m megatron_cla <command>' is the same command, e.g. under torchrun:",
        "  torchrun --nproc-per-node 8 -m megatron_cla pretrain --config X.yaml",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``megatron-cla`` with ``argv`` (default: the process's arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = ", ".join(c.name for c in COMMANDS)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(overview())
        return
    if argv and argv[0] in ("-V", "--version"):
        from megatron_cla import __version__

        print(f"megatron-cla {__version__}")
        return
    if not argv or argv[0].startswith("-"):
        sys.exit(f"megatron-cla: give a command first: {names} (megatron-cla --help)")
    command = next((c for c in COMMANDS if c.name == argv[0]), None)
    if command is None:
        sys.exit(f"megatron-cla: unknown command {argv[0]!r}; choose from {names}")
    try:
        import_module(f"megatron_cla.cli.{command.module}").main(argv[1:])
        sys.stdout.flush()  # a pipe's reader may be gone: find out here, not at exit
    except BrokenPipeError:  # e.g. `megatron-cla kv-budget ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"megatron-cla {command.name}: interrupted", file=sys.stderr)
        sys.exit(130)
