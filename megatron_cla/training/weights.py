"""A run's weights in one process, named as a single-rank ``GPTModel`` names them.

What the tools that rewrite weights share (``export-hf``, ``import-hf``, ``convert to-cla``): read
a launcher checkpoint saved at any TP/PP into one fp32 process, name its parameters the GPT way (a
``*-`` hybrid stack's names are translated, :mod:`megatron_cla.hybrid.keys`), fill a freshly built
model from such names, and write a run directory with a weights-only checkpoint atomically.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from megatron_cla.training.config import PretrainConfig, config_from_dict

__all__ = [
    "fill_model",
    "gpt_parameter_name",
    "load_parameters",
    "model_parameters",
    "one_process_config",
    "saved_run_config",
    "write_weights_only_run",
]


def gpt_parameter_name(arch: str) -> Callable[[str], str]:
    """Megatron parameter name -> its ``GPTModel`` name: the identity for GPT, HybridModel's keys
    renamed for ``hybrid`` (imported only then: it needs megatron-core's HybridModel, which
    0.16.1 lacks)."""
    if arch != "hybrid":
        return lambda name: name
    from megatron_cla.hybrid.keys import gpt_key_for_hybrid_key

    return gpt_key_for_hybrid_key


def model_parameters(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The model's parameters on the CPU, named as ``GPTModel`` names them."""
    from megatron_cla.training.model import unwrap

    rename = gpt_parameter_name(arch)
    return {rename(n): p.detach().cpu() for n, p in unwrap(model).named_parameters()}


def fill_model(model: torch.nn.Module, values: dict[str, torch.Tensor], arch: str) -> None:
    """Copy GPT-named ``values`` into every parameter of ``model`` (``KeyError`` if one is
    missing: callers check names and shapes first)."""
    from megatron_cla.training.model import unwrap

    rename = gpt_parameter_name(arch)
    with torch.no_grad():
        for name, param in unwrap(model).named_parameters():
            param.copy_(values[rename(name)])


def saved_run_config(checkpointer: Any, iteration: int) -> PretrainConfig:
    """The run config a launcher checkpoint carries; ``ValueError`` for other checkpoints."""
    try:
        saved = checkpointer.saved_run(iteration)
    except Exception as err:  # not a dist checkpoint at all
        raise ValueError(
            f"{checkpointer.path(iteration)} is not a Megatron checkpoint: {err}"
        ) from err
    if not isinstance(saved, dict) or "config" not in saved:
        raise ValueError(
            f"{checkpointer.path(iteration)} was not written by megatron-cla pretrain "
            f"(no run config in it); use launcher checkpoints"
        )
    return config_from_dict(saved["config"])


def one_process_config(cfg: PretrainConfig) -> PretrainConfig:
    """The run laid out on this one process in fp32 without FP8 (weights are only read)."""
    from megatron_cla.training.run_dir import serving_config

    cfg = serving_config(dataclasses.asdict(cfg), 1, "fp32")
    cfg.train = dataclasses.replace(cfg.train, fp8=None)
    return cfg


def load_parameters(cfg: PretrainConfig, checkpointer: Any, iteration: int) -> tuple[dict, Any]:
    """Build ``cfg``'s one-process model (``one_process_config``), load the checkpoint, return
    its GPT-named parameters and the plan. Needs a one-process world."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan

    plan = make_plan(cfg, 1, torch.cuda.is_available(), te_available=False)
    vocab = checkpointer.saved_vocab_size(iteration)
    ps.initialize_model_parallel(1, 1)
    try:
        model_parallel_cuda_manual_seed(cfg.train.seed)
        model = build_model_chunk(plan, vocab)
        checkpointer.load_weights(iteration, [model])
        return model_parameters(model, cfg.model.arch), plan
    finally:
        ps.destroy_model_parallel()


def write_weights_only_run(
    out: Path, cfg: PretrainConfig, model: torch.nn.Module, tokenizer: Optional[Path] = None
) -> Path:
    """Write the run directory ``out``: ``config.yaml``, a weights-only checkpoint of ``model``
    (step 0: a run started from it has a fresh optimizer) and a copy of ``tokenizer``
    (``tokenizer.model`` or ``tokenizer/``), in a temporary sibling renamed when complete.
    Returns the checkpoint."""
    from megatron_cla.data.tokenizer import copy_tokenizer
    from megatron_cla.training.checkpoint import Checkpointer, TrainState

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        Checkpointer(staging / "checkpoints").save_weights(
            TrainState(), [model], dataclasses.asdict(cfg)
        )
        config = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
        (staging / "config.yaml").write_text(config)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpointer(out / "checkpoints").path(0)
