"""A run's weights, one pipeline stage per rank, named as a single-rank ``GPTModel`` names them.

What the tools that rewrite weights share (``export-hf``, ``import-hf``, ``convert to-cla``), in
one process or under torchrun, where every rank holds one pipeline stage (:func:`stage_plan`):

* a stage built without initialising its parameters (:func:`empty_model_chunk`: no memory is
  touched), whose parameters are then replaced by the tensors the tool read, converted or loaded
  (:func:`adopt_parameters`: no copies, the tensors' dtype kept - a bf16 model stays bf16);
* a launcher checkpoint loaded into such a stage in the dtype it was saved in
  (:func:`load_stage`), from any TP/PP it was saved at;
* parameter names with the stage's layers numbered globally and a ``*-`` hybrid stack's keys
  translated (:func:`global_parameter_names`, :mod:`megatron_cla.hybrid.keys`);
* a run directory with a weights-only checkpoint, every rank writing its part, renamed into
  place when complete (:func:`write_weights_only_run`).
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
    "adopt_parameters",
    "collectively",
    "shared_staging",
    "stage_plan",
    "checkpoint_dtype",
    "empty_model_chunk",
    "global_parameter_names",
    "load_stage",
    "gpt_parameter_name",
    "load_parameters",
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


def stage_plan(cfg: PretrainConfig, ranks: int) -> Any:
    """The validated fp32 plan of ``cfg`` laid out as :func:`one_process_config` lays it out,
    but over ``ranks`` pipeline stages (one per rank), before anything is allocated: the layers
    must split evenly and, for CLA, every stage start on a producer."""
    from megatron_cla.training.plan import make_plan

    if ranks > 1 and cfg.model.arch != "gpt":
        raise ValueError(f"model.arch={cfg.model.arch!r}: run this on one process")
    plan_cfg = one_process_config(cfg)
    plan_cfg.parallel = dataclasses.replace(plan_cfg.parallel, pipeline=ranks)
    return make_plan(plan_cfg, ranks, on_gpu=False, te_available=False)  # weights stay on CPUs


def collectively(check: Callable[[], Any]) -> Any:
    """Run ``check`` on every rank; if any rank fails, every rank raises the first failure (so
    no rank waits forever in a later collective)."""
    import torch.distributed as dist

    try:
        result, problem = check(), None
    except (ValueError, FileNotFoundError) as err:
        result, problem = None, err
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if problem is None else (type(problem), str(problem)))
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise first[0](first[1])
    return result


def empty_model_chunk(plan: Any, vocab: int) -> torch.nn.Module:
    """This rank's model chunk with its parameters allocated but not initialised (Megatron's
    ``perform_initialization=False``: their pages stay untouched until a tensor replaces them),
    for the tools that give every parameter its value. Call it inside a model-parallel state."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.training.model import build_model_chunk

    config = plan.transformer
    before, config.perform_initialization = config.perform_initialization, False
    try:
        model_parallel_cuda_manual_seed(plan.config.train.seed)
        return build_model_chunk(plan, vocab, on_cpu=True)
    finally:
        config.perform_initialization = before


def global_parameter_names(model: torch.nn.Module, arch: str) -> dict[str, str]:
    """Local parameter name -> its name in a single-rank ``GPTModel``: a pipeline stage's layers
    numbered globally (Megatron numbers a stage's layers from 0), hybrid keys renamed."""
    from megatron_cla.training.model import unwrap

    inner, rename = unwrap(model), gpt_parameter_name(arch)
    layers = getattr(getattr(inner, "decoder", None), "layers", [])
    number = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    names = {}
    for name, _ in inner.named_parameters():
        parts = name.split(".")
        if arch != "hybrid" and parts[:2] == ["decoder", "layers"]:
            parts[2] = number[parts[2]]
        names[name] = rename(".".join(parts))
    return names


def adopt_parameters(
    model: torch.nn.Module, value_of: Callable[[str], torch.Tensor], names: dict[str, str]
) -> None:
    """Replace every parameter of ``model`` by ``value_of(names[local name])``: that tensor
    itself, in its own dtype (no copy; the parameter's Megatron attributes kept). ``ValueError``
    when a shape differs."""
    from megatron_cla.training.model import unwrap

    inner = unwrap(model)
    for local, param in list(inner.named_parameters()):
        tensor = value_of(names[local])
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{names[local]} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(param.shape)}"
            )
        owner_name, _, leaf = local.rpartition(".")
        adopted = torch.nn.Parameter(tensor.detach(), requires_grad=param.requires_grad)
        adopted.__dict__.update(param.__dict__)
        inner.get_submodule(owner_name)._parameters[leaf] = adopted


def load_stage(checkpointer: Any, iteration: int, plan: Any) -> torch.nn.Module:
    """This rank's stage of ``plan`` (from :func:`stage_plan`) holding the checkpoint's weights in
    the dtype they were saved in (a bf16 checkpoint stays bf16). Call it inside the plan's
    model-parallel state; collective."""
    from megatron_cla.training.model import unwrap

    model = empty_model_chunk(plan, checkpointer.saved_vocab_size(iteration))
    dtype = checkpoint_dtype(checkpointer, iteration)
    shapes = {n: p.shape for n, p in unwrap(model).named_parameters()}
    names = {n: n for n in shapes}
    adopt_parameters(model, lambda n: torch.empty(shapes[n], dtype=dtype), names)
    checkpointer.load_weights(iteration, [model])
    return model


def checkpoint_dtype(checkpointer: Any, iteration: int) -> torch.dtype:
    """The dtype the checkpoint's word embedding was saved in (the model's weights dtype)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpointer.path(iteration))).read_metadata()
    for key, entry in metadata.state_dict_metadata.items():
        if key.endswith("embedding.word_embeddings.weight") and hasattr(entry, "properties"):
            return entry.properties.dtype
    return torch.float32


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
    """The checkpoint's parameters in one process (``cfg`` laid out by
    :func:`one_process_config`), GPT-named, in the dtype they were saved in, and their plan.
    Needs a one-process world."""
    from megatron_cla.runtime.distributed import megatron_parallel_state
    from megatron_cla.training.model import unwrap

    plan = stage_plan(cfg, 1)
    with megatron_parallel_state(1, 1):
        model = load_stage(checkpointer, iteration, plan)
        names = global_parameter_names(model, cfg.model.arch)
        return {names[n]: p.detach() for n, p in unwrap(model).named_parameters()}, plan


def shared_staging(out: Path) -> Path:
    """A temporary sibling of ``out`` that rank 0 creates and every rank is told of."""
    import torch.distributed as dist

    staging = [None]
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging[0] = tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)
        Path(staging[0]).chmod(0o755)
    dist.broadcast_object_list(staging, src=0)
    return Path(staging[0])


def write_weights_only_run(
    out: Path, cfg: PretrainConfig, model: torch.nn.Module, tokenizer: Optional[Path] = None
) -> Path:
    """Write the run directory ``out``: ``config.yaml``, a weights-only checkpoint of ``model``
    (step 0: a run started from it has a fresh optimizer) and a copy of ``tokenizer``
    (``tokenizer.model`` or ``tokenizer/``), in a temporary sibling renamed when complete.
    Collective: every rank saves its part of the checkpoint. Returns the checkpoint."""
    import torch.distributed as dist

    from megatron_cla.data.tokenizer import copy_tokenizer
    from megatron_cla.training.checkpoint import Checkpointer, TrainState

    staging = shared_staging(out)
    try:
        Checkpointer(staging / "checkpoints").save_weights(
            TrainState(), [model], dataclasses.asdict(cfg)
        )
        if dist.get_rank() == 0:
            config = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
            (staging / "config.yaml").write_text(config)
            if tokenizer is not None:
                copy_tokenizer(tokenizer, staging)
            if out.exists():
                out.rmdir()
            staging.rename(out)
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return Checkpointer(out / "checkpoints").path(0)
