"""``megatron-cla kv-budget --config X.yaml --gpu-mem 80GB``: the KV cache of a config on a GPU.

Prints, for the config and its no-CLA twin, the KV bytes per token, one sequence's cache at several
lengths and how many sequences fit next to the weights, and writes a PNG of the longest context per
batch size; the arithmetic is :mod:`megatron_cla.inference.budget`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors
from megatron_cla.inference.budget import (
    DTYPE_BYTES,
    format_size,
    no_cla_twin,
    parse_bytes,
    plan_budget,
    plot,
    report,
)
from megatron_cla.training.config import load_config

__all__ = ["main"]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser(
        "kv-budget",
        epilog="example:\n  megatron-cla kv-budget --config configs/paper_1b_h128_mqa_cla2.yaml "
        "--gpu-mem 141GB parallel.tensor=2",
    )
    parser.add_argument("--config", type=Path, required=True, help="pretraining YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tensor=8")
    parser.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB")
    parser.add_argument(
        "--reserve", default="8GB", help="kept free for activations, logits, CUDA context"
    )
    parser.add_argument("--vocab-size", type=int, default=32000, help="tokenizer vocabulary")
    parser.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--weight-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--block-size", type=int, default=256, help="tokens per KV block")
    parser.add_argument("--lengths", default="2048,8192,32768,131072", help="sequence lengths")
    parser.add_argument("--plot", type=Path, default=Path("kv_budget.png"), help="PNG to write")
    parser.add_argument("--verbose", action="store_true", help="show library start-up notices")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    quiet_library_startup(args.verbose)
    with user_errors("kv-budget"):
        cfg = load_config(args.config, args.overrides)
        gpu, reserve = parse_bytes(args.gpu_mem), parse_bytes(args.reserve)
        lengths = [int(x) for x in args.lengths.split(",")]
        options = dict(
            vocab_size=args.vocab_size,
            kv_dtype=args.kv_dtype,
            weight_dtype=args.weight_dtype,
            block_size_tokens=args.block_size,
            reserve_bytes=reserve,
        )
        budgets = [plan_budget(c, gpu, **options) for c in (cfg, no_cla_twin(cfg))]
    if budgets[0].buffer_bytes == 0:
        sys.exit(
            f"kv-budget: the weights ({format_size(budgets[0].weight_bytes_per_gpu)}) and the "
            f"reserve leave no memory for a KV cache on a {args.gpu_mem} GPU; use more "
            f"tensor/pipeline parallelism or a smaller --reserve"
        )
    print(report(budgets, lengths, gpu))
    print(f"wrote {plot(budgets, args.plot)}")
