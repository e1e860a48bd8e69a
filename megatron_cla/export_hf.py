"""Export a launcher checkpoint as a Hugging Face model: ``python -m megatron_cla.export_hf``.

    python -m megatron_cla.export_hf --checkpoint runs/tiny_mqa_cla2 --out hf/tiny_mqa_cla2

Reads any checkpoint ``python -m megatron_cla.pretrain`` wrote (GPT or ``*-`` hybrid, any TP/PP,
TE or local spec) in one process and writes a directory that
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads with nothing but
transformers installed, whose KV cache holds the producer layers only, plus the run's tokenizer
for ``AutoTokenizer``; see :mod:`megatron_cla.serving.export`. Needs ``pip install
megatron-cla[hf]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_cla.cli import quiet_library_startup, quiet_transformers, user_errors

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_cla.export_hf", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="new Hugging Face model directory")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="tensor dtype")
    parser.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="default: DATA_DIR/tokenizer.model"
    )
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    quiet_library_startup(args.verbose)
    quiet_transformers(args.verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        sys.exit("export_hf: run it as one process (not under torchrun)")
    from megatron_cla.pretrain import init_distributed

    try:
        with user_errors("export_hf", ImportError, RuntimeError):
            from megatron_cla.serving.export import export_checkpoint

            init_distributed(on_gpu=False)
            result = export_checkpoint(
                args.checkpoint, args.out, args.dtype, args.iteration, args.tokenizer
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(
        f"wrote {result.out} from {result.checkpoint}: {result.tensors} tensors ({args.dtype}), "
        f"KV cache in layers {result.producers} of {result.config.name}"
    )
    print(f"load it: AutoModelForCausalLM.from_pretrained('{result.out}', trust_remote_code=True)")


if __name__ == "__main__":
    main()
