"""Model chunks, optimizer and LR scheduler of a run, from Megatron-Core's own building blocks."""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_cla.specs import get_cla_decoder_block_spec
from megatron_cla.training.plan import RunPlan

__all__ = [
    "padded_vocab_size",
    "resumed_vocab_size",
    "build_model_chunk",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "connect_gradient_hooks",
    "unwrap",
]


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Megatron's padding: a multiple of ``multiple x tensor_parallel`` (even vocab shards)."""
    step = multiple * tensor_parallel
    return -(-vocab_size // step) * step


def resumed_vocab_size(saved_padded: int, tensor_parallel: int) -> int:
    """The padded vocabulary of a checkpoint, checked to split evenly over ``tensor_parallel``
    (Megatron pads to a multiple of 128 x TP, so a checkpoint keeps the padding it was saved
    with when it is loaded at another TP)."""
    if saved_padded % tensor_parallel:
        fits = [t for t in (1, 2, 4, 8, 16, 32, 64) if saved_padded % t == 0]
        raise ValueError(
            f"the checkpoint's padded vocabulary ({saved_padded} rows) cannot be split over TP "
            f"{tensor_parallel}; use a TP in {fits}"
        )
    return saved_padded


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _hybrid_model(plan: RunPlan, common: dict[str, Any]) -> torch.nn.Module:
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_cla.hybrid.specs import get_cla_hybrid_stack_spec

    m = plan.config.model
    spec = get_cla_hybrid_stack_spec(
        use_transformer_engine=plan.use_transformer_engine,
        qk_layernorm=m.qk_layernorm,
        normalization=m.normalization,
    )
    return HybridModel(
        plan.transformer, spec, hybrid_layer_pattern=plan.transformer.hybrid_layer_pattern, **common
    )


def build_model_chunk(
    plan: RunPlan, padded_vocab: int, vp_stage: Optional[int] = None, on_cpu: bool = False
) -> torch.nn.Module:
    """One model chunk of this rank with the CLA specs: ``GPTModel`` or ``HybridModel`` as
    ``model.arch`` says (in ``Float16Module`` unless fp32), on this rank's GPU if it has one and
    ``on_cpu`` is not set."""
    m = plan.config.model
    common = dict(
        vocab_size=padded_vocab,
        max_sequence_length=m.seq_length,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=not m.untie_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    if m.arch == "hybrid":
        model = _hybrid_model(plan, common)
    else:
        spec = get_cla_decoder_block_spec(
            plan.transformer, use_transformer_engine=plan.use_transformer_engine, vp_stage=vp_stage
        )
        scaling = m.rope_scaling_factor
        rope = dict(rope_scaling=scaling is not None, rope_scaling_factor=scaling or 8.0)
        model = GPTModel(plan.transformer, spec, **common, **rope)
    model = model.to(torch.device("cpu") if on_cpu else _device())
    if plan.dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(plan.transformer, model)
    return model


def build_model(plan: RunPlan, padded: int) -> list[torch.nn.Module]:
    """DDP-wrapped model chunks (one per virtual pipeline stage) of this rank, with a padded
    vocabulary of ``padded`` (see :func:`padded_vocab_size`, :func:`resumed_vocab_size`); with
    ``uptrain.trainable: attention`` only the attention blocks train."""
    p = plan.config.parallel
    stages = range(p.virtual_pipeline) if p.virtual_pipeline is not None else [None]
    chunks = [build_model_chunk(plan, padded, stage) for stage in stages]
    if plan.config.uptrain.trainable == "attention":
        from megatron_cla.training.uptraining import freeze_outside_attention

        for chunk in chunks:  # before DDP: frozen parameters get no gradient buffer
            freeze_outside_attention(chunk)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=p.distributed_optimizer,
    )
    return [
        DistributedDataParallel(plan.transformer, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel / HybridModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def build_optimizer(plan: RunPlan, chunks: list[torch.nn.Module]) -> Any:
    """Megatron's optimizer (Adam with decoupled weight decay, grad clipping, mixed precision)."""
    t = plan.config.train
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=plan.dtype == torch.bfloat16,
        fp16=plan.dtype == torch.float16,
        params_dtype=plan.dtype,
        use_distributed_optimizer=plan.config.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)


def connect_gradient_hooks(plan: RunPlan, optimizer: Any) -> None:
    """What Megatron's schedules call after the last backward of a step, as ``pretrain`` sets it:
    ``finalize_model_grads`` finishes the data-parallel gradient reduction (DDP without overlap
    only reduces here), all-reduces the tied embedding/output gradients between the first and
    last pipeline stages, and the sequence-parallel norm gradients over TP; the loss is scaled by
    the optimizer's loss scaler (fp16)."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    plan.transformer.finalize_model_grads_func = finalize_model_grads
    plan.transformer.grad_scale_func = optimizer.scale_loss


def build_scheduler(plan: RunPlan, optimizer: Any) -> OptimizerParamScheduler:
    """Linear warm-up then cosine/linear decay, counted in samples as Megatron does."""
    t = plan.config.train
    samples = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr if t.lr_decay_style != "constant" else t.lr,
        lr_warmup_steps=t.warmup_iters * samples,
        lr_decay_steps=t.train_iters * samples,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters * samples,
        wd_incr_style="constant",
    )
