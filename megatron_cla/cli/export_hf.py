"""``megatron-cla export-hf --checkpoint RUN --out DIR``: a launcher run as a Hugging Face model.

Reads any checkpoint ``megatron-cla pretrain`` wrote (GPT or ``*-`` hybrid, any TP/PP, TE or local
spec) in one process and writes a directory that
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads with nothing but
transformers installed, whose KV cache holds the producer layers only, plus the run's tokenizer
for ``AutoTokenizer``; see :mod:`megatron_cla.serving.export`. Needs ``pip install
megatron-cla[hf]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, one_process_command

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser(
        "export-hf",
        epilog="example:\n  megatron-cla export-hf --checkpoint runs/tiny_mqa_cla2 "
        "--out hf/tiny_mqa_cla2",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="new Hugging Face model directory")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="tensor dtype")
    parser.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the run's tokenizer")
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    with one_process_command("export-hf", args.verbose):
        from megatron_cla.serving.export import export_checkpoint

        result = export_checkpoint(
            args.checkpoint, args.out, args.dtype, args.iteration, args.tokenizer
        )
    print(
        f"wrote {result.out} from {result.checkpoint}: {result.tensors} tensors ({args.dtype}), "
        f"KV cache in layers {result.producers} of {result.config.name}"
    )
    print(f"load it: AutoModelForCausalLM.from_pretrained('{result.out}', trust_remote_code=True)")
