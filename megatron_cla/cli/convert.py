"""``megatron-cla convert {to-cla,gpt-to-hybrid} --checkpoint RUN --out RUN2``: runs converted.

``to-cla`` turns a trained run (GPT or ``*-`` hybrid, any TP/PP, usually S = 1) into a CLA run:
``--cla-share-factor S`` (or ``--cla-producer-layers``), each producer's K/V projection the mean
over its group (``--kv-init mean``) or its own (``first``), optionally ``--query-groups G`` K/V
heads mean-pooled first; a weights-only run that ``megatron-cla pretrain`` continues (fresh
optimizer); see :mod:`megatron_cla.conversion.to_cla`.

``gpt-to-hybrid`` turns a CLA ``GPTModel`` run (any TP/PP it was saved at) into the equivalent
``*-`` ``HybridModel`` run directory (``config.yaml`` + ``checkpoints/``): same weights, optimizer
and scheduler state and data position, so ``megatron-cla pretrain --config OUT/config.yaml``
continues training it and ``megatron-cla generate --checkpoint OUT`` serves it. It runs in one
process (GPU or CPU, the run's precision); see :mod:`megatron_cla.conversion.gpt_to_hybrid`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from megatron_cla.cli.common import (
    add_cla_arguments,
    cla_target,
    command_parser,
    is_first_rank,
    one_process_command,
)

__all__ = ["main"]


def _conversion(conversions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A conversion's parser with the options every conversion takes."""
    parser = conversions.add_parser(name, help=help_text)
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="new run directory")
    parser.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser(
        "convert",
        epilog="examples:\n  megatron-cla convert to-cla --checkpoint runs/tiny_mqa "
        "--out runs/tiny_mqa_cla2 --cla-share-factor 2\n"
        "  megatron-cla convert gpt-to-hybrid --checkpoint runs/tiny_mqa_cla2 --out runs/hybrid",
    )
    conversions = parser.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")
    cla = _conversion(
        conversions, "to-cla", "a trained run -> a CLA run (K/V shared across layers), to train on"
    )
    add_cla_arguments(cla)
    _conversion(conversions, "gpt-to-hybrid", "a model.arch=gpt run -> the '*-' HybridModel run")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    import torch

    to_cla = args.conversion == "to-cla"  # weights on CPUs, one pipeline stage per rank
    on_gpu = torch.cuda.is_available() and not to_cla
    with one_process_command("convert", args.verbose, on_gpu=on_gpu, torchrun=to_cla):
        if args.conversion == "to-cla":
            target = cla_target(args)
            if target is None or (target.share_factor is None and not target.producer_layers):
                raise ValueError("to-cla needs --cla-share-factor S or --cla-producer-layers")
            from megatron_cla.conversion.to_cla import convert_run_to_cla

            path, cfg = convert_run_to_cla(args.checkpoint, args.out, target, args.iteration)
            done = f"CLA groups {_groups(cfg)}, K/V init {target.kv_init}"
        else:
            from megatron_cla._compat import require_hybrid_model

            require_hybrid_model("gpt-to-hybrid")
            from megatron_cla.conversion.gpt_to_hybrid import convert_gpt_checkpoint

            path, cfg = convert_gpt_checkpoint(args.checkpoint, args.out, args.iteration)
            done = f"hybrid_layer_pattern '{cfg.model.hybrid_layer_pattern}'"
    if not is_first_rank():
        return
    print(f"wrote {path}: {cfg.name}, {done}")
    print(f"continue training: megatron-cla pretrain --config {args.out}/config.yaml")
    print(f"generate:          megatron-cla generate --checkpoint {args.out}")


def _groups(cfg: object) -> str:
    """The CLA groups of a run's model, e.g. ``[1 2] [3 4]``."""
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.weights import one_process_config

    plan = make_plan(one_process_config(cfg), 1, on_gpu=False, te_available=False)
    return plan.transformer.cla_sharing.describe()
