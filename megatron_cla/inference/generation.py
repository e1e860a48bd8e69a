"""Text generation from a launcher checkpoint through Megatron-Core's ``DynamicInferenceEngine``.

:func:`load_engine` loads a checkpoint written by ``megatron-cla pretrain`` (any TP/PP it was saved
at) into a model with ``WORLD_SIZE`` tensor-parallel ranks and builds the engine with the CLA
paged KV cache (producer layers only); :func:`generate` serves prompts on it, batched, streaming
the first prompt's text. ``megatron-cla generate`` is the command around them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from megatron_cla.training.config import PretrainConfig
from megatron_cla.training.run_dir import find_checkpoint, run_tokenizer_path, serving_config

__all__ = [
    "GenerationSettings",
    "LoadedModel",
    "generate",
    "load_engine",
    "suppress_rows_without_text",
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


def _tokenizer(cfg: PretrainConfig, override: Optional[Path]) -> tuple[Any, Optional[int]]:
    """The run's tokenizer and the bos id its documents start with (None: no bos)."""
    from megatron_cla.data.tokenizer import document_bos, load_tokenizer

    path = run_tokenizer_path(cfg, override)
    return load_tokenizer(path), document_bos(path)


def generate(
    engine: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings,
    stream: Optional[TextIO] = None,
    bos: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Serve ``prompts`` on ``engine`` (batched); stream the first prompt's text to ``stream``.
    Each prompt starts with ``bos`` when given (as the run's training documents did).

    Returns one record per prompt: ``prompt``, ``prompt_tokens``, ``tokens``, ``text``.
    """
    params = settings.sampling_params(termination_id=tokenizer.eod)
    ids = [([] if bos is None else [bos]) + tokenizer.tokenize(p) for p in prompts]
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


def suppress_rows_without_text(model: torch.nn.Module, tokenizer_vocab: int) -> None:
    """Make ``model`` give ``-inf`` logits to the vocabulary rows past ``tokenizer_vocab``.

    Megatron pads the vocabulary (to a multiple of 128 x TP) and imported models may carry
    unused rows: those ids have no text, and Megatron's samplers would pick them all the same
    (greedy takes the argmax over every row). Each tensor-parallel rank masks its own slice of the
    output layer's logits."""
    from megatron.core import parallel_state as ps

    from megatron_cla.training.model import unwrap

    inner = unwrap(model)
    full = inner.vocab_size

    def mask(_module: Any, _inputs: Any, output: Any) -> Any:
        logits = output[0] if isinstance(output, tuple) else output
        local = logits.shape[-1]
        start = 0 if local == full else ps.get_tensor_model_parallel_rank() * local
        first_without_text = min(max(tokenizer_vocab - start, 0), local)
        logits[..., first_without_text:] = float("-inf")
        return output

    inner.output_layer.register_forward_hook(mask)


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint served by Megatron-Core's dynamic-batching engine."""

    engine: Any
    """``DynamicInferenceEngine`` with the CLA paged KV cache (producer layers only)."""
    tokenizer: Any
    """The run's tokenizer."""
    bos: Optional[int]
    """The id the run's documents start with (None: none); prompts start with it too."""
    description: str
    """One line: the checkpoint, its training and serving layouts, dtype and KV cache size."""


def load_engine(
    checkpoint: Path,
    settings: GenerationSettings,
    iteration: Optional[int] = None,
    tokenizer: Optional[Path] = None,
    precision: str = "auto",
    max_sequence_length: Optional[int] = None,
) -> LoadedModel:
    """Load a launcher checkpoint (any TP/PP it was saved at) at tensor parallelism
    ``WORLD_SIZE`` and build its engine; starts the process group unless the caller did."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.inference.engines import build_dynamic_engine
    from megatron_cla.runtime.distributed import init_distributed
    from megatron_cla.training.model import build_model_chunk, resumed_vocab_size
    from megatron_cla.training.plan import make_plan

    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", 1))
    checkpointer, iteration = find_checkpoint(checkpoint, iteration)
    saved = checkpointer.saved_run(iteration)
    cfg = serving_config(saved["config"], world, precision)
    plan = make_plan(cfg, world, on_gpu)  # validates before anything is allocated
    run_tokenizer, bos = _tokenizer(cfg, tokenizer)
    vocab = resumed_vocab_size(checkpointer.saved_vocab_size(iteration), world)
    if vocab < run_tokenizer.vocab_size:
        raise ValueError(
            f"checkpoint has {vocab} vocabulary rows, the tokenizer {run_tokenizer.vocab_size}"
        )
    init_distributed(on_gpu)
    ps.initialize_model_parallel(world, 1)
    model_parallel_cuda_manual_seed(settings.seed)
    model = build_model_chunk(plan, vocab)
    checkpointer.load_weights(iteration, [model])
    model.eval()
    suppress_rows_without_text(model, run_tokenizer.vocab_size)
    engine = build_dynamic_engine(
        model,
        run_tokenizer,
        vocab_size=vocab,
        max_sequence_length=max_sequence_length or cfg.model.seq_length,
        buffer_size_gb=settings.buffer_gb,
        block_size_tokens=settings.block_size_tokens,
        random_seed=settings.seed,
    )
    ctx = engine.context
    description = (
        f"loaded {checkpointer.path(iteration)} (step {saved['iteration']}, saved at TP "
        f"{saved['layout']['tp']} x PP {saved['layout']['pp']}) on TP {world} | "
        f"{plan.dtype} on {'GPU' if on_gpu else 'CPU'} | KV cache: "
        f"{ctx.num_attention_layers} producer layer(s) of "
        f"{plan.transformer.cla_sharing.num_layers} attention layers, "
        f"{ctx.kv_cache_bytes / 2**20:.1f} MiB per rank"
    )
    return LoadedModel(engine, run_tokenizer, bos, description)
