"""``megatron-cla convert gpt-to-hybrid --checkpoint RUN --out RUN2``: runs between model families.

``gpt-to-hybrid`` turns a CLA ``GPTModel`` run (any TP/PP it was saved at) into the equivalent
``*-`` ``HybridModel`` run directory (``config.yaml`` + ``checkpoints/``): same weights, optimizer
and scheduler state and data position, so ``megatron-cla pretrain --config OUT/config.yaml``
continues training it and ``megatron-cla generate --checkpoint OUT`` serves it. It runs in one
process (GPU or CPU, the run's precision); see :mod:`megatron_cla.conversion.gpt_to_hybrid`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, one_process_command

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser(
        "convert",
        epilog="example:\n  megatron-cla convert gpt-to-hybrid --checkpoint runs/tiny_mqa_cla2 "
        "--out runs/hybrid",
    )
    conversions = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    gpt = conversions.add_parser(
        "gpt-to-hybrid", help="a model.arch=gpt run -> the equivalent '*-' HybridModel run"
    )
    gpt.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ directory"
    )
    gpt.add_argument("--out", type=Path, required=True, help="new run directory of the hybrid")
    gpt.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    gpt.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    import torch

    with one_process_command("convert", args.verbose, on_gpu=torch.cuda.is_available()):
        from megatron_cla._compat import require_hybrid_model

        require_hybrid_model("gpt-to-hybrid")
        from megatron_cla.conversion.gpt_to_hybrid import convert_gpt_checkpoint

        path, twin = convert_gpt_checkpoint(args.checkpoint, args.out, args.iteration)
    print(f"wrote {path}: {twin.name}, hybrid_layer_pattern '{twin.model.hybrid_layer_pattern}'")
    print(f"continue training: megatron-cla pretrain --config {args.out}/config.yaml")
    print(f"generate:          megatron-cla generate --checkpoint {args.out}")
