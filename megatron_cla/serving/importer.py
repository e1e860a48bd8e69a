"""Import a Hugging Face model directory as a launcher run.

It reads a ``MegatronCLAForCausalLM`` directory (an export of this package, CLA included) or a
stock ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
(:mod:`megatron_cla.serving.architectures`; every layer then produces its own K/V). The output is
a run directory like the one pretraining writes:

* ``config.yaml``: the model from ``config.json`` (GPT, or the ``*-`` hybrid stack it was
  exported from), default training settings, ``data.tokenizer`` = the model's tokenizer;
* ``checkpoints/iter_0000000``: a weights-only checkpoint (no optimizer state);
* the model's own tokenizer: ``tokenizer/`` (a stock model's Hugging Face tokenizer files) or
  ``tokenizer.model`` (the SentencePiece model an export of ours ships).

``megatron-cla pretrain --config OUT/config.yaml`` then fine-tunes it (a fresh optimizer
from step 0; any TP/PP: the checkpoint reshards) and ``megatron-cla generate
--checkpoint OUT`` serves it. Everything is written into a temporary sibling directory that is
renamed when complete; a directory whose tensors do not fit its ``config.json`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cla.conversion.to_cla import CLATarget, converted_model, converted_run_config
from megatron_cla.data.tokenizer import is_hf_tokenizer
from megatron_cla.serving.architectures import STOCK_ARCHITECTURES, stock_model_config
from megatron_cla.serving.hf_config import (
    ARCHITECTURE,
    MODEL_TYPE,
    attention_shape,
    model_config_from_hf,
)
from megatron_cla.serving.weights import megatron_tensors_from_hf
from megatron_cla.training.config import PretrainConfig
from megatron_cla.training.weights import (
    fill_model,
    gpt_parameter_name,
    model_parameters,
    write_weights_only_run,
)

__all__ = ["ImportResult", "import_hf_model", "read_hf_tensors", "imported_run_config"]


@dataclass
class ImportResult:
    """What was imported."""

    out: Path
    """The run directory."""
    checkpoint: Path
    """Its weights-only checkpoint."""
    config: PretrainConfig
    """The run's config (also ``out/config.yaml``)."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}: not a Hugging Face model dir")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists."""
    from safetensors.torch import load_file

    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if not index.is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (nor a sharded index)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_read_json(index)["weight_map"].values())):
        if not (model_dir / shard).is_file():
            raise FileNotFoundError(f"{model_dir} lacks the shard {shard} its index lists")
        tensors.update(load_file(str(model_dir / shard)))
    return tensors


def _model_config(hf: dict) -> Any:
    """The launcher model of an export of ours or of a stock architecture."""
    if hf.get("model_type") == MODEL_TYPE:
        return model_config_from_hf(hf)
    if set(hf.get("architectures") or []) & set(STOCK_ARCHITECTURES):
        return stock_model_config(hf)
    known = {ARCHITECTURE: MODEL_TYPE, **STOCK_ARCHITECTURES}
    raise ValueError(
        f"config.json architectures={hf.get('architectures')!r}, model_type="
        f"{hf.get('model_type')!r}: the importable models are "
        + ", ".join(f"{arch} ({kind})" for arch, kind in known.items())
    )


def model_tokenizer(model_dir: Path, hf: dict) -> Path:
    """The tokenizer an imported model keeps: the SentencePiece model of an export of ours, a
    stock model's Hugging Face tokenizer (``tokenizer.json``; else its ``tokenizer.model``)."""
    spm_model = model_dir / "tokenizer.model"
    if hf.get("model_type") != MODEL_TYPE and is_hf_tokenizer(model_dir):
        return model_dir
    if spm_model.is_file():
        return spm_model
    raise FileNotFoundError(
        f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model): an imported model "
        f"keeps its own tokenizer; copy it into the directory"
    )


def imported_run_config(hf: dict, out: Path, name: str, tokenizer: Path) -> PretrainConfig:
    """The run config of an imported model living in ``out`` (an absolute path) with the
    tokenizer ``tokenizer`` (what :func:`model_tokenizer` found)."""
    cfg = PretrainConfig(name=name, model=_model_config(hf))
    kept = "tokenizer" if is_hf_tokenizer(tokenizer) else "tokenizer.model"
    cfg.data = dataclasses.replace(cfg.data, dir=str(out / "data"), tokenizer=str(out / kept))
    cfg.logging = dataclasses.replace(cfg.logging, run_dir=str(out))
    return cfg


def _drop_redundant(tensors: dict[str, torch.Tensor], tied: bool) -> None:
    """Remove what a checkpoint may carry besides the weights: RoPE buffers of older
    transformers releases, and the output matrix of a tied model saved anyway (it must equal
    the embedding)."""
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]
    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if tied and head is not None:
        if embedding is None or not torch.equal(head, embedding):
            raise ValueError(
                "config.json tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight: the tensors do not fit config.json"
            )
        del tensors["lm_head.weight"]


def _check_vocab(hf: dict, tensors: dict[str, torch.Tensor]) -> int:
    rows = int(hf["vocab_size"])
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is None:
        raise ValueError("the Hugging Face model has no tensor model.embed_tokens.weight")
    if embedding.shape[0] != rows:
        raise ValueError(
            f"model.embed_tokens.weight has {embedding.shape[0]} rows, config.json vocab_size "
            f"{rows}: the tensors do not fit config.json"
        )
    return rows


def _plan(cfg: PretrainConfig) -> Any:
    """The validated one-process fp32 plan of the import (before anything is allocated)."""
    from megatron_cla.training.plan import make_plan

    plan_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    return make_plan(plan_cfg, 1, torch.cuda.is_available(), te_available=False)


def _build_and_fill(cfg: PretrainConfig, plan: Any, tensors: dict, vocab: int) -> torch.nn.Module:
    """The one-process fp32 model holding the HF weights."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.training.model import build_model_chunk, unwrap

    model_parallel_cuda_manual_seed(cfg.train.seed)
    model = build_model_chunk(plan, vocab)
    rename = gpt_parameter_name(cfg.model.arch)
    expected = {rename(n): p.shape for n, p in unwrap(model).named_parameters()}
    values = megatron_tensors_from_hf(tensors, expected, attention_shape(cfg.model))
    fill_model(model, values, cfg.model.arch)
    return model


def import_hf_model(
    model_dir: Path, out: Path, name: Optional[str] = None, cla: Optional[CLATarget] = None
) -> ImportResult:
    """Import ``model_dir`` as the run directory ``out``, converted to the sharing ``cla`` when
    given (:mod:`megatron_cla.conversion.to_cla`). Needs a one-process world, which the caller
    has started."""
    from megatron.core import parallel_state as ps

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")
    hf = _read_json(model_dir / "config.json")
    _model_config(hf)  # an unknown architecture is refused before the tokenizer is looked for
    tokenizer = model_tokenizer(model_dir, hf)
    name = name or f"{model_dir.resolve().name}-imported"
    cfg = imported_run_config(hf, out.resolve(), name, tokenizer)
    plan = _plan(cfg)
    final_cfg = cfg if cla is None else converted_run_config(cfg, cla, out.resolve())
    tensors = read_hf_tensors(model_dir)
    _drop_redundant(tensors, tied=not cfg.model.untie_embeddings)
    vocab = _check_vocab(hf, tensors)
    ps.initialize_model_parallel(1, 1)
    try:
        model = _build_and_fill(cfg, plan, tensors, vocab)
        if cla is not None:
            params = model_parameters(model, cfg.model.arch)
            sharing = plan.transformer.cla_sharing
            model = converted_model(params, cfg, sharing, final_cfg, cla, vocab)
        path = write_weights_only_run(out, final_cfg, model, tokenizer)
    finally:
        ps.destroy_model_parallel()
    return ImportResult(out, path, final_cfg)
