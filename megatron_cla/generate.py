"""Generate text from a pretraining checkpoint: ``python -m megatron_cla.generate``.

Loads a checkpoint written by ``python -m megatron_cla.pretrain`` (any TP/PP it was saved at)
into a model with ``WORLD_SIZE`` tensor-parallel ranks (run it directly for TP=1, under
``torchrun --nproc-per-node N`` for TP=N), and serves the prompts through Megatron-Core's
``DynamicInferenceEngine`` with the CLA paged KV cache (producer layers only). Tokens are streamed
to stdout as they are generated; ``--json`` writes the prompts, token ids and texts as well.

    python -m megatron_cla.generate --checkpoint runs/tiny_mqa_cla2 --prompt "It is a truth"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, TextIO

import torch
import torch.distributed as dist

from megatron_cla.cli import quiet_library_startup, user_errors
from megatron_cla.training.config import PretrainConfig, config_from_dict

__all__ = [
    "GenerationSettings",
    "find_checkpoint",
    "serving_config",
    "run_tokenizer_path",
    "generate",
    "main",
]


@dataclasses.dataclass
class GenerationSettings:
    """How to sample; ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 64
    """Tokens to generate per prompt (fewer if the end-of-document token comes first)."""
    temperature: float = 0.0
    """Softmax temperature; 0 picks the most likely token at every step."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: no limit); ignored when greedy."""
    top_p: float = 0.0
    """Nucleus sampling mass (0: off); ignored when greedy."""
    seed: int = 1234
    """Sampling seed."""
    buffer_gb: float = 0.25
    """Size of the paged KV buffer (holds producer layers only)."""
    block_size_tokens: int = 256
    """Tokens per KV block of the paged cache."""

    def sampling_params(self, termination_id: int) -> Any:
        """Megatron's ``SamplingParams`` for these settings."""
        from megatron.core.inference.sampling_params import SamplingParams

        greedy = self.temperature == 0.0
        return SamplingParams(
            temperature=1.0 if greedy else self.temperature,
            top_k=1 if greedy else self.top_k,
            top_p=0.0 if greedy else self.top_p,
            num_tokens_to_generate=self.max_new_tokens,
            termination_id=termination_id,
        )


def find_checkpoint(path: Path, iteration: Optional[int] = None) -> tuple[Any, int]:
    """The ``Checkpointer`` and iteration for a run directory, a checkpoint directory, or an
    ``iter_NNNNNNN`` directory (newest complete one unless ``iteration`` is given)."""
    from megatron_cla.training.checkpoint import Checkpointer

    path = Path(path)
    if path.name.startswith("iter_"):
        if iteration is not None and int(path.name.split("_")[1]) != iteration:
            raise ValueError(f"--checkpoint {path} and --iteration {iteration} disagree")
        return Checkpointer(path.parent), int(path.name.split("_")[1].split(".")[0])
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    checkpointer = Checkpointer(path)
    if iteration is None:
        return checkpointer, checkpointer.latest_complete()
    if iteration not in checkpointer.complete_iterations():
        raise FileNotFoundError(f"no complete checkpoint iter_{iteration:07d} in {path}")
    return checkpointer, iteration


def serving_config(
    saved: dict[str, Any], tensor_parallel: int, precision: str = "auto"
) -> PretrainConfig:
    """The saved pretraining config re-laid-out for serving on ``tensor_parallel`` ranks."""
    cfg = config_from_dict(saved)
    cfg.parallel = dataclasses.replace(
        cfg.parallel,
        tensor=tensor_parallel,
        pipeline=1,
        virtual_pipeline=None,
        pipeline_layout=None,
        context=1,
        sequence_parallel=False,
        distributed_optimizer=False,
    )
    cfg.train = dataclasses.replace(
        cfg.train,
        global_batch_size=cfg.train.micro_batch_size,
        precision=precision,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
    )
    pattern = cfg.model.hybrid_layer_pattern  # one pipeline stage: no segment separators
    pattern = None if pattern is None else pattern.replace("|", "")
    cfg.model = dataclasses.replace(cfg.model, dropout=0.0, hybrid_layer_pattern=pattern)
    return cfg


def run_tokenizer_path(cfg: PretrainConfig, override: Optional[Path] = None) -> Path:
    """The SentencePiece model of a run: ``override``, else the data directory's, else
    ``data.tokenizer`` (an imported run whose data is not prepared yet)."""
    path = override or Path(cfg.data.dir) / "tokenizer.model"
    if override is None and not path.is_file() and cfg.data.tokenizer is not None:
        path = Path(cfg.data.tokenizer)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path} (the run's data.dir); pass --tokenizer path/to/tokenizer.model"
        )
    return path


def _tokenizer(cfg: PretrainConfig, override: Optional[Path]) -> Any:
    from megatron_cla.data.tokenizer import load_tokenizer

    return load_tokenizer(run_tokenizer_path(cfg, override))


def generate(
    engine: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings,
    stream: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """Serve ``prompts`` on ``engine`` (batched); stream the first prompt's text to ``stream``.

    Returns one record per prompt: ``prompt``, ``prompt_tokens``, ``tokens``, ``text``.
    """
    params = settings.sampling_params(termination_id=tokenizer.eod)
    ids = [tokenizer.tokenize(p) for p in prompts]
    for request_id, tokens in enumerate(ids):
        engine.add_request(request_id, tokens, params)
    generated: dict[int, list[int]] = {i: [] for i in range(len(ids))}
    shown = ""
    while engine.has_unfinished_requests():
        result = engine.step_modern()
        for record in result["finished_request_records"]:
            request = record.merge() if hasattr(record, "merge") else record
            generated[int(request.request_id)] = [int(t) for t in request.generated_tokens]
        for request_id in result["active_request_ids"]:
            request = engine.get_request(int(request_id))
            generated[int(request_id)] = [int(t) for t in request.generated_tokens]
        if stream is not None:
            text = tokenizer.detokenize(generated[0])
            stream.write(text[len(shown) :] if text.startswith(shown) else "\n" + text)
            stream.flush()
            shown = text
    return [
        {
            "prompt": prompt,
            "prompt_tokens": ids[i],
            "tokens": generated[i],
            "text": tokenizer.detokenize(generated[i]),
        }
        for i, prompt in enumerate(prompts)
    ]


def _load_engine(args: argparse.Namespace, settings: GenerationSettings) -> tuple[Any, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.inference.engines import build_dynamic_engine
    from megatron_cla.pretrain import init_distributed
    from megatron_cla.training.model import build_model_chunk, resumed_vocab_size
    from megatron_cla.training.plan import make_plan

    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", 1))
    checkpointer, iteration = find_checkpoint(args.checkpoint, args.iteration)
    saved = checkpointer.saved_run(iteration)
    cfg = serving_config(saved["config"], world, args.precision)
    plan = make_plan(cfg, world, on_gpu)  # validates before anything is allocated
    tokenizer = _tokenizer(cfg, args.tokenizer)
    vocab = resumed_vocab_size(checkpointer.saved_vocab_size(iteration), world)
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"checkpoint has {vocab} vocabulary rows, the tokenizer {tokenizer.vocab_size}"
        )
    max_length = args.max_sequence_length or cfg.model.seq_length
    init_distributed(on_gpu)
    ps.initialize_model_parallel(world, 1)
    model_parallel_cuda_manual_seed(settings.seed)
    model = build_model_chunk(plan, vocab)
    checkpointer.load_weights(iteration, [model])
    model.eval()
    engine = build_dynamic_engine(
        model,
        tokenizer,
        vocab_size=vocab,
        max_sequence_length=max_length,
        buffer_size_gb=settings.buffer_gb,
        block_size_tokens=settings.block_size_tokens,
        random_seed=settings.seed,
    )
    if dist.get_rank() == 0:
        ctx = engine.context
        print(
            f"loaded {checkpointer.path(iteration)} (step {saved['iteration']}, saved at TP "
            f"{saved['layout']['tp']} x PP {saved['layout']['pp']}) on TP {world} | "
            f"{plan.dtype} on {'GPU' if on_gpu else 'CPU'} | KV cache: "
            f"{ctx.num_attention_layers} producer layer(s) of "
            f"{plan.transformer.cla_sharing.num_layers} attention layers, "
            f"{ctx.kv_cache_bytes / 2**20:.1f} MiB per rank",
            file=sys.stderr,
            flush=True,
        )
    return engine, tokenizer


def _parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, GenerationSettings]:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_cla.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run, checkpoints or iter_ dir"
    )
    parser.add_argument("--iteration", type=int, default=None, help="default: newest complete")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="default: DATA_DIR/tokenizer.model"
    )
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
    with user_errors(f"cannot serve {args.checkpoint}"):
        engine, tokenizer = _load_engine(args, settings)
    first = dist.get_rank() == 0
    if first:
        sys.stdout.write(args.prompt[0])
    start = time.perf_counter()
    results = generate(engine, tokenizer, args.prompt, settings, sys.stdout if first else None)
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


if __name__ == "__main__":
    main()
