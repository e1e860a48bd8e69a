"""``megatron-cla import-hf --model DIR --out RUN``: a Hugging Face model as a launcher run.

Reads a directory ``megatron-cla export-hf`` wrote (or the same model saved by transformers), or a
stock Llama, Mistral, Qwen2 or Qwen3 model, optionally converts it to CLA (the options of
``megatron-cla convert to-cla``), and writes a run directory (``config.yaml``, a
weights-only checkpoint and the tokenizer) that ``megatron-cla pretrain --config OUT/config.yaml``
fine-tunes and ``megatron-cla generate --checkpoint OUT`` serves; see
:mod:`megatron_cla.serving.importer`. Needs ``pip install megatron-cla[hf]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import (
    add_cla_arguments,
    cla_target,
    command_parser,
    is_first_rank,
    one_process_command,
)

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser(
        "import-hf",
        epilog="examples:\n  megatron-cla import-hf --model hf/tiny_mqa_cla2 --out runs/imported\n"
        "  megatron-cla import-hf --model Llama-2-7b-hf --out runs/llama-cla2 "
        "--cla-share-factor 2 --kv-init mean",
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--out", type=Path, required=True, help="new run directory")
    parser.add_argument("--name", default=None, help="run name (default: MODEL-imported)")
    add_cla_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    with one_process_command("import-hf", args.verbose, torchrun=True):
        from megatron_cla.serving.importer import import_hf_model

        result = import_hf_model(args.model, args.out, args.name, cla_target(args))
    if not is_first_rank():
        return
    model = result.config.model
    sharing = f"cla_share_factor {model.cla_share_factor}"
    if model.cla_producer_layers is not None:
        sharing = f"cla_producer_layers {model.cla_producer_layers}"
    print(f"wrote {result.checkpoint}: {result.config.name}, model.arch {model.arch}, {sharing}")
    print(f"fine-tune: megatron-cla pretrain --config {args.out}/config.yaml")
    print(f"generate:  megatron-cla generate --checkpoint {args.out} --prompt ...")
