"""Convert a CLA ``GPTModel`` checkpoint of the launcher into the equivalent ``*-`` HybridModel one.

Megatron's own GPT -> hybrid translation expects the homogeneous GPT key layout and rejects
per-layer checkpoints, which every CLA model with consumers has. This converter instead loads the
GPT run as it was trained (model, optimizer, scheduler, data position; any TP/PP it was saved at,
resharded to one process) and moves every tensor to the hybrid twin by name: GPT layer ``i`` is
hybrid layers ``2i`` (``*``) and ``2i + 1`` (``-``), see :mod:`megatron_cla.hybrid.keys`. The twin
keeps the sharing (CLA counts the ``*`` layers, which are the GPT layers in order) and the pipeline
stages (``|`` where the GPT stages began). The result is a launcher checkpoint: the hybrid run
resumes from it where the GPT run stopped, with the same logits and optimizer state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from megatron_cla.hybrid.keys import hybrid_key_for_gpt_key
from megatron_cla.training.config import PretrainConfig, config_from_dict

__all__ = ["hybrid_twin_config", "convert_gpt_checkpoint"]


def _gpt_chunk_sizes(cfg: PretrainConfig) -> list[int]:
    """Layers of every GPT pipeline chunk, in Megatron's chunk order (stage, then chunk)."""
    from megatron_cla.training.plan import make_plan
    from megatron_cla.validation import pipeline_chunks

    p = cfg.parallel
    plan = make_plan(cfg, p.tensor * p.pipeline * p.context, on_gpu=True, te_available=True)
    return [size for _, _, _, size in pipeline_chunks(plan.transformer)]


def hybrid_twin_config(cfg: PretrainConfig, run_dir: Optional[Path] = None) -> PretrainConfig:
    """The same run as a ``*-`` HybridModel, its GPT pipeline stages marked with ``|``,
    logging to ``run_dir`` (and checkpointing to ``run_dir/checkpoints``) when given."""
    if cfg.model.arch != "gpt":
        raise ValueError(
            f"{cfg.name} is already a model.arch={cfg.model.arch!r} run; gpt-to-hybrid converts "
            f"model.arch=gpt checkpoints"
        )
    pattern = "|".join("*-" * size for size in _gpt_chunk_sizes(cfg))
    model = dataclasses.replace(
        cfg.model, arch="hybrid", num_layers=None, hybrid_layer_pattern=pattern
    )
    parallel = dataclasses.replace(cfg.parallel, pipeline_layout=None)
    twin = dataclasses.replace(cfg, name=f"{cfg.name}-hybrid", model=model, parallel=parallel)
    if run_dir is not None:
        twin.logging = dataclasses.replace(twin.logging, run_dir=str(run_dir))
        twin.checkpoint = dataclasses.replace(twin.checkpoint, dir=None)
    return twin


def _one_process(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` laid out on this single process (the checkpoint is resharded on load); batch
    sizes and precision stay as trained, so the optimizer and scheduler state fit."""
    pattern = cfg.model.hybrid_layer_pattern
    model = cfg.model
    if pattern is not None:
        model = dataclasses.replace(model, hybrid_layer_pattern=pattern.replace("|", ""))
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor=1,
        pipeline=1,
        virtual_pipeline=None,
        pipeline_layout=None,
        context=1,
        sequence_parallel=False,
    )
    return dataclasses.replace(cfg, model=model, parallel=parallel)


def _build(cfg: PretrainConfig, vocab: int) -> tuple[Any, Any, Any, Any]:
    """(plan, model chunks, optimizer, scheduler) of ``cfg`` on this process."""
    from megatron_cla.training.model import build_model, build_optimizer, build_scheduler
    from megatron_cla.training.plan import make_plan

    plan = make_plan(cfg, 1)
    chunks = build_model(plan, vocab)
    optimizer = build_optimizer(plan, chunks)
    return plan, chunks, optimizer, build_scheduler(plan, optimizer)


def _optimizer_params(optimizer: Any, names: dict[int, str]) -> list[str]:
    groups = getattr(optimizer, "chained_optimizers", [optimizer])
    return [names[id(p)] for o in groups for g in o.param_groups for p in g["params"]]


def _transfer(gpt: tuple, hybrid: tuple) -> None:
    """Copy weights and optimizer state, after checking the parameters correspond one to one."""
    from megatron_cla.training.model import unwrap

    (_, gpt_chunks, gpt_opt, gpt_sched), (_, hyb_chunks, hyb_opt, hyb_sched) = gpt, hybrid
    gpt_params = dict(unwrap(gpt_chunks[0]).named_parameters())
    hyb_params = dict(unwrap(hyb_chunks[0]).named_parameters())
    mapped = {hybrid_key_for_gpt_key(name): name for name in gpt_params}
    if sorted(mapped) != sorted(hyb_params):
        raise RuntimeError(
            f"the GPT and hybrid parameters do not correspond: "
            f"{sorted(set(mapped) ^ set(hyb_params))[:5]}"
        )
    gpt_order = _optimizer_params(gpt_opt, {id(p): n for n, p in gpt_params.items()})
    hyb_order = _optimizer_params(hyb_opt, {id(p): n for n, p in hyb_params.items()})
    if [hybrid_key_for_gpt_key(n) for n in gpt_order] != hyb_order:
        raise RuntimeError("the optimizers hold the corresponding parameters in another order")
    with torch.no_grad():
        for hybrid_name, gpt_name in mapped.items():
            hyb_params[hybrid_name].copy_(gpt_params[gpt_name])
    hyb_opt.load_state_dict(copy.deepcopy(gpt_opt.state_dict()))
    hyb_sched.load_state_dict(gpt_sched.state_dict())


def convert_gpt_checkpoint(
    checkpoint: Path, out: Path, iteration: Optional[int] = None
) -> tuple[Path, PretrainConfig]:
    """Write the hybrid twin of a launcher GPT checkpoint as the run directory ``out``
    (``config.yaml`` and ``checkpoints/``; written in a temporary directory, renamed when
    complete), so that ``megatron-cla pretrain --config out/config.yaml`` resumes it.
    Needs a one-process world, which the caller has started. Returns (checkpoint, config)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.runtime.distributed import megatron_parallel_state
    from megatron_cla.training.checkpoint import Checkpointer
    from megatron_cla.training.model import resumed_vocab_size
    from megatron_cla.training.run_dir import find_checkpoint

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; choose a new directory")
    checkpointer, iteration = find_checkpoint(Path(checkpoint), iteration)
    saved = checkpointer.saved_run(iteration)
    if "config" not in saved:
        raise ValueError(f"{checkpointer.path(iteration)} was not written by megatron-cla pretrain")
    gpt_cfg = config_from_dict(saved["config"])
    if gpt_cfg.parallel.distributed_optimizer:
        raise ValueError(
            "runs with parallel.distributed_optimizer keep Adam's state in Megatron's sharded "
            "optimizer layout, which the converter does not move yet; convert a run trained "
            "without it"
        )
    twin = hybrid_twin_config(gpt_cfg, out.resolve())
    vocab = resumed_vocab_size(checkpointer.saved_vocab_size(iteration), 1)
    with megatron_parallel_state(1, 1):
        model_parallel_cuda_manual_seed(gpt_cfg.train.seed)
        gpt = _build(_one_process(gpt_cfg), vocab)
        state = checkpointer.load(iteration, gpt[1], gpt[2], gpt[3])
        hybrid = _build(_one_process(twin), vocab)
        _transfer(gpt, hybrid)
        _save_atomically(out, state, hybrid, twin, checkpointer.path(iteration))
    return Checkpointer(out / "checkpoints").path(state.iteration), twin


def _save_atomically(out: Path, state: Any, hybrid: tuple, twin: PretrainConfig, src: Path):
    """Save into a temporary sibling directory, rename it to ``out`` when complete."""
    from megatron_cla.training.checkpoint import Checkpointer

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        checkpoints = Checkpointer(staging / "checkpoints")
        checkpoints.save(state, hybrid[1], hybrid[2], hybrid[3], asdict(twin))
        (staging / "config.yaml").write_text(yaml.safe_dump(asdict(twin), sort_keys=False))
        (staging / "converted_from.json").write_text(json.dumps({"gpt_checkpoint": str(src)}))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
