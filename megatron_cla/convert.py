"""Convert launcher checkpoints between model families.

    python -m megatron_cla.convert gpt-to-hybrid --checkpoint runs/tiny_mqa_cla2 --out runs/hybrid

``gpt-to-hybrid`` turns a CLA ``GPTModel`` run (any TP/PP it was saved at) into the equivalent
``*-`` ``HybridModel`` run directory (``config.yaml`` + ``checkpoints/``): same weights, optimizer
and scheduler state and data position, so ``python -m megatron_cla.pretrain --config
OUT/config.yaml`` continues training it and ``python -m megatron_cla.generate --checkpoint OUT``
serves it. It runs in one process (GPU or CPU, the run's precision); see
:mod:`megatron_cla.hybrid.convert`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cla.cli import quiet_library_startup, user_errors

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_cla.convert", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gpt = commands.add_parser(
        "gpt-to-hybrid", help="a model.arch=gpt run -> the equivalent '*-' HybridModel run"
    )
    gpt.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ directory"
    )
    gpt.add_argument("--out", type=Path, required=True, help="new run directory of the hybrid")
    gpt.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    quiet_library_startup()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        sys.exit("convert: run it as one process (not under torchrun)")
    from megatron_cla._compat import require_hybrid_model
    from megatron_cla.pretrain import init_distributed

    try:
        with user_errors("convert", ImportError, RuntimeError):
            require_hybrid_model("gpt-to-hybrid")
            from megatron_cla.hybrid.convert import convert_gpt_checkpoint

            init_distributed(torch.cuda.is_available())
            path, twin = convert_gpt_checkpoint(args.checkpoint, args.out, args.iteration)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"wrote {path}: {twin.name}, hybrid_layer_pattern '{twin.model.hybrid_layer_pattern}'")
    print(f"continue training: python -m megatron_cla.pretrain --config {args.out}/config.yaml")
    print(f"generate:          python -m megatron_cla.generate --checkpoint {args.out}")


if __name__ == "__main__":
    main()
