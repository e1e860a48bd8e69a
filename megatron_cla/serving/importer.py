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

The weights are read one tensor at a time in the files' dtype (a bf16 model is imported as bf16)
and become the model's parameters without copies; under torchrun every rank reads, converts and
saves one pipeline stage, so a 70B model needs about 1/N of its bytes per rank.

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

from megatron_cla.conversion.to_cla import CLATarget, converted_run_config
from megatron_cla.data.tokenizer import is_hf_tokenizer
from megatron_cla.serving.architectures import STOCK_ARCHITECTURES, stock_model_config
from megatron_cla.serving.hf_config import (
    ARCHITECTURE,
    MODEL_TYPE,
    attention_shape,
    model_config_from_hf,
)
from megatron_cla.serving.hf_files import HFTensors
from megatron_cla.serving.weights import check_hf_names, hf_sources, megatron_tensor_from_hf
from megatron_cla.training.config import PretrainConfig
from megatron_cla.training.model import unwrap
from megatron_cla.training.weights import (
    adopt_parameters,
    collectively,
    empty_model_chunk,
    global_parameter_names,
    stage_plan,
    write_weights_only_run,
)

__all__ = ["ImportResult", "import_hf_model", "imported_run_config"]


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


def _ignored(reader: HFTensors) -> set[str]:
    """What a checkpoint may carry besides the weights: RoPE buffers of older releases."""
    return {n for n in reader.names() if n.endswith("rotary_emb.inv_freq")}


def _check_tied(reader: HFTensors, tied: bool) -> set[str]:
    """The output matrix of a tied model saved anyway must equal the embedding; it is then
    not read (returns the names to skip)."""
    if not tied or "lm_head.weight" not in reader:
        return set()
    if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise ValueError(
            "config.json tie_word_embeddings=true but lm_head.weight differs from "
            "model.embed_tokens.weight: the tensors do not fit config.json"
        )
    return {"lm_head.weight"}


def _check_vocab(hf: dict, reader: HFTensors) -> int:
    rows = int(hf["vocab_size"])
    if "model.embed_tokens.weight" not in reader:
        raise ValueError("the Hugging Face model has no tensor model.embed_tokens.weight")
    found = reader.shape("model.embed_tokens.weight")[0]
    if found != rows:
        raise ValueError(
            f"model.embed_tokens.weight has {found} rows, config.json vocab_size "
            f"{rows}: the tensors do not fit config.json"
        )
    return rows


def _stage_tensors(
    reader: HFTensors, cfg: PretrainConfig, plans: tuple, vocab: int, cla: Optional[CLATarget]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """This rank's model (its stage, parameters unallocated) and the tensors it adopts."""
    import torch.distributed as dist

    from megatron_cla.conversion.grouped import converted_stage_tensors

    source_plan, plan = plans
    shape = attention_shape(cfg.model)
    source = empty_model_chunk(source_plan, vocab)  # names and shapes only: never filled
    names = global_parameter_names(source, cfg.model.arch)
    sizes = {names[n]: p.shape for n, p in unwrap(source).named_parameters()}
    del source
    tied = not cfg.model.untie_embeddings
    skip = _check_tied(reader, tied) | _ignored(reader)
    sources = collectively(lambda: hf_sources(list(sizes), shape))
    if tied and "output_layer.weight" in sources:  # a pipeline's last stage keeps a copy
        sources["output_layer.weight"] = ["model.embed_tokens.weight"]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sources)
    whole = {k: v for stage in everyone for k, v in stage.items()}
    collectively(lambda: check_hf_names(whole, reader.names() - skip))

    def read(name: str) -> torch.Tensor:
        return megatron_tensor_from_hf(name, sizes[name], sources[name], reader.get, shape)

    if cla is None:
        return empty_model_chunk(plan, vocab), {name: read(name) for name in sizes}
    values = converted_stage_tensors(
        list(sizes),
        read,
        shape,
        source_plan.transformer.cla_sharing,
        plan.transformer.cla_sharing,
        cla.kv_init,
        cla.query_groups,
    )
    return empty_model_chunk(plan, vocab), values


def import_hf_model(
    model_dir: Path, out: Path, name: Optional[str] = None, cla: Optional[CLATarget] = None
) -> ImportResult:
    """Import ``model_dir`` as the run directory ``out``, converted to the sharing ``cla`` when
    given (:mod:`megatron_cla.conversion`). Collective over the world the caller started: one
    process, or torchrun ranks that each read and write one pipeline stage (the tensors it
    owns, in the files' dtype)."""
    import torch.distributed as dist

    from megatron_cla.runtime.distributed import megatron_parallel_state

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")
    hf = _read_json(model_dir / "config.json")
    _model_config(hf)  # an unknown architecture is refused before the tokenizer is looked for
    tokenizer = model_tokenizer(model_dir, hf)
    name = name or f"{model_dir.resolve().name}-imported"
    cfg = imported_run_config(hf, out.resolve(), name, tokenizer)
    final_cfg = cfg if cla is None else converted_run_config(cfg, cla, out.resolve())
    ranks = dist.get_world_size()
    plans = (stage_plan(cfg, ranks), stage_plan(final_cfg, ranks))
    reader = HFTensors(model_dir)
    vocab = _check_vocab(hf, reader)
    with megatron_parallel_state(1, ranks):
        model, values = _stage_tensors(reader, cfg, plans, vocab, cla)
        adopt_parameters(model, values.__getitem__, global_parameter_names(model, cfg.model.arch))
        del values
        path = write_weights_only_run(out, final_cfg, model, tokenizer)
    return ImportResult(out, path, final_cfg)
