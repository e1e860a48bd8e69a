"""A trained run converted into a CLA run (``megatron-cla convert to-cla``, ``import-hf --cla-*``).

The run (GPT or a ``*-`` hybrid stack, any TP/PP it was saved at) is read into one fp32 process,
its weights go through :func:`convert_parameters` (K/V heads pooled if asked, then the new
sharing: :mod:`megatron_cla.conversion.cla_weights`), and the result is written as a new run
directory with a weights-only checkpoint (and a copy of the run's own tokenizer, if it has one):
``megatron-cla pretrain --config OUT/config.yaml`` continues training it (a fresh optimizer from
step 0) on the source run's data. The new run keeps the source's parallel layout, which must
suit the new sharing (every pipeline stage starts on a producer); that is checked, like the rest,
before any weight is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cla.conversion.cla_weights import check_merges_groups, pool_kv_heads, share_kv
from megatron_cla.conversion.qkv_layout import attention_shape
from megatron_cla.training.config import ModelConfig, PretrainConfig, UptrainConfig

__all__ = [
    "CLATarget",
    "cla_model_config",
    "convert_parameters",
    "convert_run_to_cla",
    "converted_run_config",
]


@dataclass(frozen=True)
class CLATarget:
    """The sharing a converted model gets."""

    share_factor: Optional[int] = None
    """S: producers at layers 1, S+1, ... (attention layers of a hybrid stack)."""
    producer_layers: Optional[tuple[int, ...]] = None
    """Explicit 1-based producers instead of S."""
    kv_init: str = "mean"
    """``mean``: each producer's K/V projection is its group's mean; ``first``: its own."""
    query_groups: Optional[int] = None
    """K/V heads after mean-pooling (GQA-style), before the sharing; None keeps them."""


def cla_model_config(model: ModelConfig, target: CLATarget) -> ModelConfig:
    """``model`` with the sharing and K/V heads of ``target``."""
    if target.share_factor is not None and target.producer_layers is not None:
        raise ValueError(
            f"--cla-share-factor {target.share_factor} and --cla-producer-layers "
            f"{list(target.producer_layers)}: give one of them"
        )
    producers = None if target.producer_layers is None else list(target.producer_layers)
    return dataclasses.replace(
        model,
        cla_share_factor=1 if target.share_factor is None else target.share_factor,
        cla_producer_layers=producers,
        num_query_groups=target.query_groups or model.num_query_groups,
    )


def convert_parameters(
    params: dict[str, torch.Tensor],
    model: ModelConfig,
    source: Any,
    target_sharing: Any,
    kv_init: str,
    query_groups: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """GPT-named ``params`` of ``model`` (sharing ``source``) as the weights of the model with
    ``target_sharing`` and ``query_groups`` K/V heads."""
    shape = attention_shape(model)
    if query_groups is not None:
        params, shape = pool_kv_heads(params, shape, query_groups)
    return share_kv(params, shape, target_sharing, kv_init, source)


def _check_gpt_like(model: ModelConfig) -> None:
    pattern = (model.hybrid_layer_pattern or "").replace("|", "")
    if model.arch == "hybrid" and pattern != "*-" * (len(pattern) // 2):
        raise ValueError(
            f"model.hybrid_layer_pattern={model.hybrid_layer_pattern!r}: to-cla converts GPT "
            f"runs and '*-' hybrid stacks (one attention and one MLP layer per GPT layer)"
        )


def converted_run_config(cfg: PretrainConfig, target: CLATarget, out: Path) -> PretrainConfig:
    """The config of the converted run living in ``out`` (absolute), validated at the source's
    parallel layout."""
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.weights import one_process_config

    model = cla_model_config(cfg.model, target)
    new = dataclasses.replace(cfg, name=f"{cfg.name}-cla", model=model)
    new.logging = dataclasses.replace(cfg.logging, run_dir=str(out))
    new.checkpoint = dataclasses.replace(cfg.checkpoint, dir=None, load_iteration=None)
    new.uptrain = UptrainConfig()  # how to uptrain the new run is the user's next choice
    if cfg.data.tokenizer is not None:  # the run's own tokenizer is copied into the new run
        kept = "tokenizer.model" if cfg.data.tokenizer.endswith(".model") else "tokenizer"
        new.data = dataclasses.replace(cfg.data, tokenizer=str(out / kept))
    sharings = [
        make_plan(one_process_config(c), 1, False, te_available=False).transformer.cla_sharing
        for c in (new, cfg)
    ]
    check_merges_groups(*sharings)
    p = cfg.parallel
    make_plan(new, p.tensor * p.pipeline * p.context, on_gpu=True, te_available=True)
    return new


def convert_run_to_cla(
    checkpoint: Path, out: Path, target: CLATarget, iteration: Optional[int] = None
) -> tuple[Path, PretrainConfig]:
    """Write the CLA run ``out`` converted from a launcher checkpoint (run, ``checkpoints`` or
    ``iter_`` directory). Collective over the world the caller started: one process, or torchrun
    ranks that each convert one pipeline stage (in the checkpoint's dtype; tensors the
    conversion does not change are passed on, not copied). Returns the new checkpoint and
    config."""
    import torch.distributed as dist

    from megatron_cla.conversion.grouped import converted_stage_tensors
    from megatron_cla.runtime.distributed import megatron_parallel_state
    from megatron_cla.training.model import unwrap
    from megatron_cla.training.run_dir import find_checkpoint
    from megatron_cla.training.weights import (
        adopt_parameters,
        empty_model_chunk,
        global_parameter_names,
        load_stage,
        saved_run_config,
        stage_plan,
        write_weights_only_run,
    )

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; choose a new one")
    checkpointer, iteration = find_checkpoint(Path(checkpoint), iteration)
    cfg = saved_run_config(checkpointer, iteration)
    _check_gpt_like(cfg.model)
    new_cfg = converted_run_config(cfg, target, out.resolve())
    ranks = dist.get_world_size()
    source_plan = stage_plan(cfg, ranks)
    plan = stage_plan(new_cfg, ranks)
    with megatron_parallel_state(1, ranks):
        source = load_stage(checkpointer, iteration, source_plan)
        names = global_parameter_names(source, cfg.model.arch)
        params = {names[n]: p.detach() for n, p in unwrap(source).named_parameters()}
        del source
        values = converted_stage_tensors(
            list(params),
            params.pop,  # each source tensor is read once: what is not passed on is freed
            attention_shape(cfg.model),
            source_plan.transformer.cla_sharing,
            plan.transformer.cla_sharing,
            target.kv_init,
            target.query_groups,
        )
        model = empty_model_chunk(plan, checkpointer.saved_vocab_size(iteration))
        adopt_parameters(model, values.pop, global_parameter_names(model, cfg.model.arch))
        tokenizer = None if cfg.data.tokenizer is None else Path(cfg.data.tokenizer)
        path = write_weights_only_run(out, new_cfg, model, tokenizer)
    return path, new_cfg
