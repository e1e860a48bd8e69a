"""Export a launcher checkpoint as a Hugging Face model directory.

The checkpoint (GPT or ``*-`` hybrid, any TP/PP it was saved at, TE or local spec) is loaded into
a one-process model with the local spec, which resharding makes possible, and its parameters are
mapped to ``MegatronCLAForCausalLM`` (:mod:`megatron_cla.serving.weights`). The directory gets:

* ``config.json`` (``auto_map`` to the bundled model files, every architecture field, the
  producer layers), ``generation_config.json`` (greedy; padded vocabulary rows suppressed);
* ``model.safetensors``: consumers have query and output projections only;
* ``configuration_megatron_cla.py`` / ``modeling_megatron_cla.py`` (need only transformers);
* ``tokenizer.json`` and friends, checked to encode and decode as the run's SentencePiece model.

Everything is written into a temporary sibling directory that is renamed when complete.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cla.serving.hf_config import attention_shape, check_exportable, hf_config_fields
from megatron_cla.serving.weights import hf_tensors_from_megatron
from megatron_cla.training.config import PretrainConfig

__all__ = ["DTYPES", "ExportResult", "export_checkpoint", "write_hf_model"]

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


def _empty_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")


def copy_model_files(out: Path) -> None:
    """Put the transformers model's two Python files (``auto_map``'s targets) into ``out``."""
    for name in MODEL_FILES:
        shutil.copyfile(_HF_DIR / name, out / name)


def write_hf_model(
    out: Path, fields: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Path
) -> None:
    """Write a complete model directory into the (new, empty) directory ``out``."""
    from safetensors.torch import save_file
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
    weights = out / "model.safetensors"
    save_file(dict(sorted(tensors.items())), str(weights), {"format": "pt"})
    weights.chmod((out / "config.json").stat().st_mode & 0o777)  # safetensors writes it 0600
    copy_model_files(out)


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    dtype: str = "fp32",
    iteration: Optional[int] = None,
    tokenizer: Optional[Path] = None,
) -> ExportResult:
    """Export a launcher checkpoint (run, ``checkpoints`` or ``iter_`` directory) to ``out``.
    Needs a one-process world, which the caller has started."""
    from megatron_cla.training.run_dir import find_checkpoint, run_tokenizer_path
    from megatron_cla.training.weights import load_parameters, one_process_config, saved_run_config

    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    _empty_out(out)
    checkpointer, iteration = find_checkpoint(Path(checkpoint), iteration)
    run_cfg = saved_run_config(checkpointer, iteration)
    check_exportable(run_cfg.model)
    cfg = one_process_config(run_cfg)
    tokenizer = run_tokenizer_path(cfg, tokenizer)
    params, plan = load_parameters(cfg, checkpointer, iteration)
    tensors = hf_tensors_from_megatron(params, attention_shape(cfg.model))
    tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    from megatron_cla.serving.tokenizer import hf_tokenizer_size

    fields = hf_config_fields(
        run_cfg.model,
        plan.transformer.ffn_hidden_size,
        plan.transformer.cla_sharing,
        vocab_rows=params["embedding.word_embeddings.weight"].shape[0],
        tokenizer_vocab=hf_tokenizer_size(tokenizer),
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
    )
    _write_atomically(out, fields, tensors, tokenizer)
    return ExportResult(
        out, checkpointer.path(iteration), run_cfg, len(tensors), fields["cla_producer_layers"]
    )


def _write_atomically(out: Path, fields: dict, tensors: dict, tokenizer: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        write_hf_model(staging, fields, tensors, tokenizer)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
