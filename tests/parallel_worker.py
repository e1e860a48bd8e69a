"""Per-rank training run used by the parallel-layout tests (spawned by ``run_on_ranks``).

Builds a CLA GPT with Megatron's real machinery for the given layout (parallel state, per-chunk
block specs, Megatron DDP, ``get_megatron_optimizer``, ``get_forward_backward_func`` schedules,
``finalize_model_grads``), gives it the same key-seeded weights as every other layout, runs two
training steps and reports losses, global-keyed gradient shards of step 1 and parameter shards
after the optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_cla import get_cla_decoder_block_spec
from megatron_cla.testing import model_parallel
from megatron_cla.testing.norms import with_norm
from megatron_cla.testing.sharding import collect_shards, fill_from_global
from tests.helpers import SEQ, build_gpt, make_batch, tiny_config

MICRO_BATCH = 2
NUM_MICROBATCHES = 4  # global batch 8 sequences; divisible by PP and DP sizes used in tests


def _build_chunks(config: Any, sequence_parallel_norms: bool) -> list[torch.nn.Module]:
    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp is not None else None
        stages = dict(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        if getattr(config, "hybrid_layer_pattern", None):
            chunks.append(_hybrid_chunk(config, sequence_parallel_norms, stages))
            continue
        spec = get_cla_decoder_block_spec(config, use_transformer_engine=False, vp_stage=stage)
        if sequence_parallel_norms:
            spec = with_norm(spec)
        chunks.append(build_gpt(config, spec, **stages))  # weights: fill_from_global
    return chunks


def _hybrid_chunk(config: Any, sequence_parallel_norms: bool, stages: dict) -> torch.nn.Module:
    from tests.hybrid_helpers import build_hybrid, cla_hybrid_spec, with_hybrid_norm

    spec = cla_hybrid_spec()
    if sequence_parallel_norms:
        spec = with_hybrid_norm(spec)
    return build_hybrid(config, spec, config.hybrid_layer_pattern, **stages)


def _forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple:
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )

    def loss_func(per_token: torch.Tensor) -> tuple:
        loss = per_token.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _microbatches(step: int) -> list[dict]:
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = range(dp_rank, NUM_MICROBATCHES, dp)  # each DP rank takes every dp-th microbatch
    return [make_batch(seed=100 * step + i, batch=MICRO_BATCH) for i in mine]


def _step_losses(losses: list[dict]) -> list[float]:
    return [float(x["lm loss"]) for x in losses]


def _config(model_overrides: dict[str, Any], parallel: dict[str, Any]) -> Any:
    """GPT: 8 layers; hybrid: the pattern of ``hybrid_layer_pattern`` (pipes kept at PP > 1)."""
    pattern = model_overrides.get("hybrid_layer_pattern")
    if pattern is None:
        return tiny_config(num_layers=8, **parallel, **model_overrides)
    from tests.hybrid_helpers import tiny_hybrid_config

    if parallel["pipeline_model_parallel_size"] == 1:
        pattern = pattern.replace("|", "")
    return tiny_hybrid_config(
        pattern, **parallel, **{**model_overrides, "hybrid_layer_pattern": pattern}
    )


def train_two_steps(layout: dict[str, Any], model_overrides: dict[str, Any]) -> dict[str, Any]:
    """Run on every rank; ``layout`` has tp, pp, vp, sp (bools/ints), ``model_overrides`` config."""
    tp, pp, vp = layout.get("tp", 1), layout.get("pp", 1), layout.get("vp")
    sp = layout.get("sp", False)
    with model_parallel(tp, pp, vp):
        parallel = dict(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vp,
            sequence_parallel=sp,
            batch_p2p_comm=not torch.distributed.get_backend() == "gloo",
        )
        config = _config(model_overrides, parallel)
        chunks = _build_chunks(config, sequence_parallel_norms=sp)
        fill_from_global(chunks)
        ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False)
        chunks = [
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        config.finalize_model_grads_func = finalize_model_grads
        # Adam's update g / (|g| + eps) amplifies fp32 rounding differences of near-zero
        # gradients without bound when eps is tiny; eps=1e-4 keeps the step comparable across
        # layouts (to ~1e-7) while still exercising Megatron's optimizer and grad clipping.
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-4, clip_grad=1.0), chunks
        )
        schedule = get_forward_backward_func()
        report: dict[str, Any] = {"losses": []}
        for step in range(2):
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            data = _microbatches(step)
            iterators = [iter(list(data)) for _ in chunks]
            losses = schedule(
                forward_step_func=_forward_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(data),
                seq_length=SEQ,
                micro_batch_size=MICRO_BATCH,
                forward_only=False,
            )
            report["losses"].append(_step_losses(losses))
            if step == 0:
                report["grads"] = collect_shards(chunks, gradients=True)
            optimizer.step()
        report["params"] = collect_shards(chunks)
        report["rank"] = dict(
            tp=ps.get_tensor_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_rank(),
            dp=ps.get_data_parallel_rank(),
        )
    return report
