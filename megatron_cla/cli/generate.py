"""``megatron-cla generate --checkpoint RUN --prompt TEXT [--prompt ...]``.

Loads a checkpoint written by ``megatron-cla pretrain`` (any TP/PP it was saved at) on
``WORLD_SIZE`` tensor-parallel ranks (run it directly for TP=1, under ``torchrun --nproc-per-node
N -m megatron_cla generate`` for TP=N) and serves the prompts through Megatron-Core's
``DynamicInferenceEngine`` with the CLA paged KV cache (producer layers only); see
:mod:`megatron_cla.inference.generation`. Tokens are streamed to stdout as they are generated;
``--json`` writes the prompts, token ids and texts as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from megatron_cla.cli.common import command_parser, quiet_library_startup, user_errors
from megatron_cla.inference.generation import GenerationSettings

__all__ = ["main"]

EXAMPLES = """examples:
  megatron-cla generate --checkpoint runs/tiny_mqa_cla2 --prompt "It is a truth"
  torchrun --nproc-per-node 2 -m megatron_cla generate --checkpoint RUN --prompt A --prompt B"""


def _parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, GenerationSettings]:
    parser = command_parser("generate", epilog=EXAMPLES)
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ dir"
    )
    parser.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the run's tokenizer")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPU), fp32, bf16")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="default: seq_length")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="show library warnings")
    for field in dataclasses.fields(GenerationSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(field.default), default=field.default
        )
    args = parser.parse_args(argv)
    settings = GenerationSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationSettings)}
    )
    if settings.max_new_tokens < 1 or settings.temperature < 0 or settings.buffer_gb <= 0:
        parser.error(
            f"--max-new-tokens={settings.max_new_tokens} must be >= 1, --temperature="
            f"{settings.temperature} >= 0 and --buffer-gb={settings.buffer_gb} > 0"
        )
    return args, settings


def main(argv: Optional[list[str]] = None) -> None:
    args, settings = _parse(argv)
    quiet_library_startup(args.verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # keep the generated text readable: Megatron's serving chatter too
        warnings.simplefilter("ignore")
        logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch.distributed as dist

    from megatron_cla.inference.generation import generate, load_engine

    with user_errors(f"cannot serve {args.checkpoint}"):
        loaded = load_engine(
            args.checkpoint,
            settings,
            args.iteration,
            args.tokenizer,
            args.precision,
            args.max_sequence_length,
        )
    first = dist.get_rank() == 0
    if first:
        print(loaded.description, file=sys.stderr, flush=True)
        sys.stdout.write(args.prompt[0])
    start = time.perf_counter()
    stream = sys.stdout if first else None
    results = generate(loaded.engine, loaded.tokenizer, args.prompt, settings, stream, loaded.bos)
    seconds = time.perf_counter() - start
    if first:
        print()
        for i, record in enumerate(results[1:], start=1):
            print(f"--- prompt {i}\n{record['prompt']}{record['text']}")
        tokens = sum(len(r["tokens"]) for r in results)
        print(
            f"{len(results)} prompt(s), {tokens} tokens in {seconds:.2f} s "
            f"({tokens / seconds:.1f} tokens/s)",
            file=sys.stderr,
        )
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
