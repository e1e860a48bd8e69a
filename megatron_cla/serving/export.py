"""Export a launcher checkpoint as a Hugging Face model directory.

The checkpoint (GPT or ``*-`` hybrid, any TP/PP it was saved at, TE or local spec) is loaded into
a one-process model with the local spec, which resharding makes possible, and its parameters are
mapped to Hugging Face names (:mod:`megatron_cla.serving.weights`). Two formats:

* a model imported from a stock architecture (``model.hf_architecture``) whose layers all compute
  their own K/V goes back as that architecture: ``config.json`` of ``LlamaForCausalLM``,
  ``Qwen3ForCausalLM``, ... (:func:`~megatron_cla.serving.architectures.stock_config_fields`),
  ``generation_config.json``, ``model.safetensors`` and the tokenizer; no code;
* any other model (CLA, or trained from scratch) as ``MegatronCLAForCausalLM``: ``config.json``
  (``auto_map`` to the bundled model files, every architecture field, the producer layers),
  ``generation_config.json`` (greedy; padded vocabulary rows suppressed), ``model.safetensors``
  (consumers have query and output projections only), ``configuration_megatron_cla.py`` /
  ``modeling_megatron_cla.py`` (need only transformers) and the tokenizer.

The tokenizer is the run's: a Hugging Face tokenizer's files as they are, or the run's
SentencePiece model as ``tokenizer.json`` checked to encode and decode as it does. The weights go
to ``model.safetensors``, or to shards of at most 5 GB (Hugging Face's default) with their index,
one tensor at a time; under torchrun every rank loads one pipeline stage in the checkpoint's dtype
and writes its own shards. Everything is written into a temporary sibling directory that is
renamed when complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cla.serving.architectures import stock_config_fields
from megatron_cla.serving.hf_config import (
    ARCHITECTURE,
    attention_shape,
    check_exportable,
    hf_config_fields,
)
from megatron_cla.serving.hf_files import MAX_SHARD_BYTES, ShardWriter, finish_shards
from megatron_cla.serving.weights import hf_tensors_from_megatron
from megatron_cla.training.config import PretrainConfig
from megatron_cla.training.weights import shared_staging, stage_plan

__all__ = [
    "DTYPES",
    "ExportResult",
    "export_checkpoint",
    "write_hf_model",
    "write_stock_model",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_FILES = ("configuration_megatron_cla.py", "modeling_megatron_cla.py")
_HF_DIR = Path(__file__).resolve().parent / "hf"


@dataclass
class ExportResult:
    """What was exported."""

    out: Path
    """The Hugging Face model directory."""
    checkpoint: Path
    """The launcher checkpoint (``iter_NNNNNNN``) it came from."""
    config: PretrainConfig
    """The run's config."""
    tensors: int
    """Tensors in ``model.safetensors``."""
    producers: list[int]
    """0-based producer layers (the layers with a KV cache)."""
    architecture: str
    """The architecture written (``config.json``'s ``architectures``)."""

    @property
    def needs_remote_code(self) -> bool:
        """Whether transformers loads it with ``trust_remote_code=True`` only (our model code)."""
        return self.architecture == ARCHITECTURE


def _empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")


def copy_model_files(out: Path) -> None:
    """Put the transformers model's two Python files (``auto_map``'s targets) into ``out``."""
    for name in MODEL_FILES:
        shutil.copyfile(_HF_DIR / name, out / name)


def write_hf_model(out: Path, fields: dict[str, Any], tokenizer: Path) -> None:
    """Write a ``MegatronCLAForCausalLM`` directory's config, generation config, tokenizer and
    model files into ``out`` (the weights are written apart)."""
    from transformers import GenerationConfig

    from megatron_cla.serving.hf.configuration_megatron_cla import MegatronCLAConfig
    from megatron_cla.serving.tokenizer import write_run_tokenizer

    special = write_run_tokenizer(tokenizer, out, fields["max_position_embeddings"])
    config = MegatronCLAConfig(**fields, **special)
    config.save_pretrained(str(out))
    padded = list(range(config.tokenizer_vocab_size, config.vocab_size))
    GenerationConfig(do_sample=False, suppress_tokens=padded or None, **special).save_pretrained(
        str(out)
    )
    copy_model_files(out)


def write_stock_model(out: Path, fields: dict[str, Any], tokenizer: Path) -> None:
    """Write a stock-architecture directory's ``config.json`` (``fields`` from
    :func:`~megatron_cla.serving.architectures.stock_config_fields`), generation config and
    tokenizer into ``out``; no code (the weights are written apart)."""
    from transformers import AutoConfig, GenerationConfig

    from megatron_cla.serving.tokenizer import check_auto_tokenizer, write_run_tokenizer

    special = write_run_tokenizer(tokenizer, out, fields["max_position_embeddings"])
    config = AutoConfig.for_model(**fields, **special)
    config.architectures = fields["architectures"]
    config.save_pretrained(str(out))
    check_auto_tokenizer(tokenizer, out)
    GenerationConfig(**special).save_pretrained(str(out))


def _is_stock(model: Any, sharing: Any) -> bool:
    """A model imported from a stock architecture whose layers all compute their own K/V."""
    return model.hf_architecture is not None and not sharing.has_consumers


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    dtype: str = "fp32",
    iteration: Optional[int] = None,
    tokenizer: Optional[Path] = None,
    max_shard_bytes: Optional[int] = None,
) -> ExportResult:
    """Export a launcher checkpoint (run, ``checkpoints`` or ``iter_`` directory) to ``out``:
    an imported model without CLA as its stock architecture, any other model as
    ``MegatronCLAForCausalLM``. Collective over the world the caller started: one process, or
    torchrun ranks that each load one pipeline stage (in the checkpoint's dtype) and stream it
    into their own safetensors shards of at most ``max_shard_bytes`` (default
    :data:`~megatron_cla.serving.hf_files.MAX_SHARD_BYTES`)."""
    import torch.distributed as dist

    from megatron_cla.runtime.distributed import megatron_parallel_state
    from megatron_cla.training.run_dir import find_checkpoint, run_tokenizer_path
    from megatron_cla.training.weights import load_stage, one_process_config, saved_run_config

    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    _empty_out(out)
    checkpointer, iteration = find_checkpoint(Path(checkpoint), iteration)
    run_cfg = saved_run_config(checkpointer, iteration)
    check_exportable(run_cfg.model)
    cfg = one_process_config(run_cfg)
    tokenizer = run_tokenizer_path(cfg, tokenizer)
    plan = stage_plan(cfg, dist.get_world_size())
    fields, write = _format(
        run_cfg, plan, checkpointer.saved_vocab_size(iteration), dtype, tokenizer
    )
    staging = shared_staging(out)
    try:
        with megatron_parallel_state(1, dist.get_world_size()):
            model = load_stage(checkpointer, iteration, plan)
            limit = max_shard_bytes or MAX_SHARD_BYTES
            written = _stream_weights(model, cfg, staging, DTYPES[dtype], limit)
            del model
        shards = [None] * dist.get_world_size()
        dist.all_gather_object(shards, written)
        if dist.get_rank() == 0:
            write(staging, fields, tokenizer)
            finish_shards(staging, shards, (staging / "config.json").stat().st_mode & 0o777)
            staging.rename(out)
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
    producers = [p - 1 for p in plan.transformer.cla_sharing.producer_layers]
    count = sum(len(w["weight_map"]) for w in shards)
    return ExportResult(
        out, checkpointer.path(iteration), run_cfg, count, producers, fields["architectures"][0]
    )


def _format(run_cfg: Any, plan: Any, vocab_rows: int, dtype: str, tokenizer: Path) -> tuple:
    """(config fields, metadata writer) of the export: the stock architecture or ours."""
    hf_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    sharing = plan.transformer.cla_sharing
    if _is_stock(run_cfg.model, sharing):
        model = dataclasses.replace(
            run_cfg.model,
            num_layers=plan.transformer.num_layers,
            ffn_hidden_size=plan.transformer.ffn_hidden_size,
            head_dim=plan.transformer.kv_channels,
        )
        return stock_config_fields(model, vocab_rows, hf_dtype), write_stock_model
    from megatron_cla.serving.tokenizer import hf_tokenizer_size

    fields = hf_config_fields(
        run_cfg.model,
        plan.transformer.ffn_hidden_size,
        sharing,
        vocab_rows=vocab_rows,
        tokenizer_vocab=hf_tokenizer_size(tokenizer),
        dtype=hf_dtype,
    )
    return fields, write_hf_model


def _stream_weights(
    model: torch.nn.Module, cfg: Any, out: Path, dtype: torch.dtype, max_shard_bytes: int
) -> dict[str, Any]:
    """Write this rank's HF tensors into its own shards, one tensor at a time."""
    import torch.distributed as dist

    from megatron_cla.training.model import unwrap
    from megatron_cla.training.weights import global_parameter_names

    names = global_parameter_names(model, cfg.model.arch)
    tied = not cfg.model.untie_embeddings
    params = [
        (names[n], p)
        for n, p in unwrap(model).named_parameters()
        if not (tied and names[n] == "output_layer.weight")  # a last stage's copy
    ]
    shape = attention_shape(cfg.model)

    def converted(name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return hf_tensors_from_megatron({name: param}, shape)

    planned = []
    for name, param in params:
        for hf_name, tensor in converted(name, param.to("meta")).items():
            planned.append((hf_name, dtype, tuple(tensor.shape)))
    writer = ShardWriter(out, f".rank{dist.get_rank():05d}", planned, max_shard_bytes)
    for name, param in params:
        for hf_name, tensor in converted(name, param).items():
            writer.write(hf_name, tensor.to(dtype))
    writer.close()
    return {
        "files": writer.files,
        "weight_map": writer.weight_map,
        "total_bytes": writer.total_bytes,
    }
