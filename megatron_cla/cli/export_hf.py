"""``megatron-cla export-hf --checkpoint RUN --out DIR``: a launcher run as a Hugging Face model.

Reads any checkpoint ``megatron-cla pretrain`` wrote (GPT or ``*-`` hybrid, any TP/PP, TE or local
spec) in one process and writes a directory that
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads with nothing but
transformers installed, whose KV cache holds the producer layers only, plus the run's tokenizer
for ``AutoTokenizer``. A model imported from a stock architecture (``LlamaForCausalLM``, ...) whose
layers all compute their own K/V goes back as that architecture, no remote code needed; see
:mod:`megatron_cla.serving.export`. Needs ``pip install
megatron-cla[hf]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, is_first_rank, one_process_command

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
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default=None,
        help="largest weights file, e.g. 500MB (default: 5GB, Hugging Face's)",
    )
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser.parse_args(argv)


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes."""
    value = text.strip().upper()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if value.endswith(u)), "")
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use e.g. 5GB, 500MB or a byte count") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard must hold at least one byte")
    return int(number * _UNITS.get(unit, 1))


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    with one_process_command("export-hf", args.verbose, torchrun=True):
        from megatron_cla.serving.export import export_checkpoint

        result = export_checkpoint(
            args.checkpoint,
            args.out,
            args.dtype,
            args.iteration,
            args.tokenizer,
            args.max_shard_size,
        )
    if not is_first_rank():
        return
    print(
        f"wrote {result.out} from {result.checkpoint}: {result.architecture}, {result.tensors} "
        f"tensors ({args.dtype}), KV cache in layers {result.producers} of {result.config.name}"
    )
    remote = ", trust_remote_code=True" if result.needs_remote_code else ""
    print(f"load it: AutoModelForCausalLM.from_pretrained('{result.out}'{remote})")
