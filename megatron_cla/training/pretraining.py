"""A whole pretraining job in this process: :func:`run_pretraining` (``megatron-cla pretrain``).

Run it in one process (CPU or one GPU) or in every rank that ``torchrun``/``srun`` started (see
``launch/``); NCCL is used on GPUs and gloo on CPUs. The config is validated against the world size
before anything is allocated; the data directory is prepared from the embedded corpus (or
``data.inputs``) when it does not exist; the run resumes from its newest complete checkpoint unless
``checkpoint.resume=false``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
import yaml

from megatron_cla.accounting import DecoderShape, kv_cache_bytes_per_token
from megatron_cla.runtime.distributed import init_distributed, megatron_parallel_state
from megatron_cla.sharing import KVSharing
from megatron_cla.training.config import PretrainConfig

if TYPE_CHECKING:
    from megatron_cla.training.plan import RunPlan
    from megatron_cla.training.teacher import TeacherPlan

__all__ = ["describe_model", "run_pretraining"]


def _prepare_data(cfg: PretrainConfig) -> Path:
    from megatron_cla.data.corpus import EMBEDDED_CORPUS
    from megatron_cla.data.prepare import prepare

    directory = Path(cfg.data.dir)
    if dist.get_rank() == 0 and not (directory / "manifest.json").is_file():
        inputs = [Path(p) for p in cfg.data.inputs] or [EMBEDDED_CORPUS]
        print(f"preparing data in {directory} from {[str(p) for p in inputs]}", flush=True)
        tokenizer = None if cfg.data.tokenizer is None else Path(cfg.data.tokenizer)
        prepare(inputs, directory, cfg.data.vocab_size, cfg.data.valid_percent, tokenizer)
    dist.barrier()
    return directory


def _check_same_tokenizer(cfg: PretrainConfig, data_tokenizer: Path) -> None:
    """A run with its own tokenizer (``data.tokenizer``: imported or converted models) refuses
    data prepared with another one, which would only show as a loss that does not go down."""
    from megatron_cla.data.tokenizer import tokenizer_fingerprint

    if cfg.data.tokenizer is None:
        return
    want = tokenizer_fingerprint(Path(cfg.data.tokenizer))
    got = tokenizer_fingerprint(data_tokenizer)
    if want != got:
        raise ValueError(
            f"data.dir={cfg.data.dir} was prepared with another tokenizer ({data_tokenizer}, "
            f"fingerprint {got}) than the run's data.tokenizer={cfg.data.tokenizer} ({want}); "
            f"prepare the data with `megatron-cla prepare-data --tokenizer "
            f"{cfg.data.tokenizer} --input ... --out NEW_DIR` and set data.dir=NEW_DIR"
        )


def _datasets(plan: RunPlan, directory: Path):
    from megatron_cla.data.datasets import DataFiles, build_gpt_datasets
    from megatron_cla.data.tokenizer import load_tokenizer

    cfg = plan.config
    files = DataFiles.from_dir(directory)
    _check_same_tokenizer(cfg, files.tokenizer)
    tokenizer = load_tokenizer(files.tokenizer)
    train_samples = cfg.train.train_iters * cfg.train.global_batch_size
    result = None
    for builder_pass in (0, 1):  # rank 0 writes the index cache first, the others then read it
        if (dist.get_rank() == 0) == (builder_pass == 0):
            result = build_gpt_datasets(
                files,
                tokenizer,
                cfg.model.seq_length,
                cfg.data.seed,
                train_samples,
                None,
                directory / "cache",
            )
        dist.barrier()
    return tokenizer, result


def _kv_bytes(plan: RunPlan) -> tuple[int, int]:
    """KV bytes/token with CLA and without (every attention layer a producer)."""
    sharing = plan.transformer.cla_sharing
    shape = DecoderShape.from_config(plan.transformer, sharing)
    dense = DecoderShape.from_config(plan.transformer, KVSharing.uniform(sharing.num_layers, 1))
    return kv_cache_bytes_per_token(shape), kv_cache_bytes_per_token(dense)


def describe_model(plan: RunPlan) -> str:
    """``GPT, CLA groups [1 2] [3 4]`` or ``hybrid '*-*-*-*-', CLA groups [*1@L1 *2@L3] ...``."""
    sharing, layout = plan.transformer.cla_sharing, plan.transformer.cla_hybrid_layout
    if layout is None:
        return f"GPT, CLA groups {sharing.describe()}"
    return f"hybrid {layout.pattern!r}, CLA groups {layout.describe(sharing)}"


def _count_parameters(chunks: list, trainable_only: bool = False) -> int:
    from megatron.core import parallel_state as ps

    counted = [p for c in chunks for p in c.parameters() if p.requires_grad or not trainable_only]
    local = torch.tensor(
        [float(sum(p.numel() for p in counted))],
        device=next(chunks[0].parameters()).device,
    )
    dist.all_reduce(local, group=ps.get_model_parallel_group())
    return int(local.item())


def _plan_teacher(cfg: PretrainConfig, plan: RunPlan, vocab: int) -> Optional[TeacherPlan]:
    """The checked teacher of a distillation run (``uptrain.teacher``), None without one."""
    from megatron_cla.training.run_dir import run_tokenizer_path
    from megatron_cla.training.teacher import check_teacher_tokenizer, plan_teacher

    if cfg.uptrain.teacher is None:
        return None
    teacher = plan_teacher(cfg, plan.world_size, vocab)
    check_teacher_tokenizer(teacher, run_tokenizer_path(cfg))
    return teacher


def _distillation_step(cfg: PretrainConfig, teacher: TeacherPlan, reporter: Any) -> Any:
    """Load the frozen teacher; the training steps' schedule callback that distils from it."""
    from megatron_cla.training.distillation import distillation_forward_step
    from megatron_cla.training.teacher import load_teacher

    model = load_teacher(teacher)
    u = cfg.uptrain
    reporter.print(
        f"distilling from {teacher.describe()} | loss = {1 - u.kd_weight:g} x CE + "
        f"{u.kd_weight:g} x {u.kd_temperature:g}^2 x KL(teacher || student)"
    )
    return distillation_forward_step(model, u.kd_weight, u.kd_temperature)


def run_pretraining(cfg: PretrainConfig) -> Optional[float]:
    """Run a whole pretraining job in this (already launched) process; returns final val ppl."""
    from megatron_cla.training.plan import make_plan

    on_gpu = torch.cuda.is_available()
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    plan = make_plan(cfg, world, on_gpu)  # before any allocation
    started_here = init_distributed(on_gpu)
    p = cfg.parallel
    with megatron_parallel_state(
        p.tensor,
        p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
    ):
        val_ppl = _train_in_parallel_state(cfg, plan, on_gpu)
        dist.barrier()
    if started_here:
        dist.destroy_process_group()
    return val_ppl


def _train_in_parallel_state(cfg: PretrainConfig, plan: RunPlan, on_gpu: bool) -> Optional[float]:
    """Build the run (data, model, optimizer, checkpoint to resume) and train it; returns the
    final validation perplexity."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla.training.batches import BatchStream
    from megatron_cla.training.checkpoint import Checkpointer, TrainState
    from megatron_cla.training.loop import Run, train
    from megatron_cla.training.metrics import RunReporter
    from megatron_cla.training.model import (
        build_model,
        build_optimizer,
        build_scheduler,
        connect_gradient_hooks,
        padded_vocab_size,
        resumed_vocab_size,
    )

    p = cfg.parallel
    model_parallel_cuda_manual_seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.logging.run_dir)
    tokenizer, (train_set, valid_set) = _datasets(plan, _prepare_data(cfg))
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep)
    complete = checkpointer.complete_iterations() if cfg.checkpoint.resume else []
    iteration = cfg.checkpoint.load_iteration or (complete[-1] if complete else None)
    vocab = padded_vocab_size(tokenizer.vocab_size, p.tensor)
    if iteration is not None:
        vocab = resumed_vocab_size(checkpointer.saved_vocab_size(iteration), p.tensor)
    teacher = _plan_teacher(cfg, plan, vocab)  # checked before the student is allocated
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    chunks = build_model(plan, vocab)
    optimizer = build_optimizer(plan, chunks)
    connect_gradient_hooks(plan, optimizer)
    scheduler = build_scheduler(plan, optimizer)
    state, weights_only = TrainState(), False
    if iteration is not None:
        weights_only = checkpointer.is_weights_only(iteration)
        state = checkpointer.load(iteration, chunks, optimizer, scheduler)
    device = next(chunks[0].parameters()).device
    dp, dp_rank = plan.data_parallel, ps.get_data_parallel_rank()
    stream = BatchStream(
        train_set, cfg.train.micro_batch_size, dp, dp_rank, device, state.consumed_samples
    )
    valid = BatchStream(valid_set, cfg.train.micro_batch_size, dp, dp_rank, device)
    eval_batches = [valid.step(plan.num_microbatches) for _ in range(cfg.logging.eval_iters)]
    reporter = RunReporter(
        run_dir,
        cfg.train.train_iters,
        plan.tokens_per_step,
        _kv_bytes(plan),
        cfg.logging.tensorboard,
        cfg.logging.progress_bar,
        cfg.logging.log_interval,
    )
    params = _count_parameters(chunks)
    trainable = _count_parameters(chunks, trainable_only=True)
    reporter.print(
        f"{cfg.name}: {params:,} parameters"
        + (f" ({trainable:,} trainable: attention only)" if trainable < params else "")
        + f" | {describe_model(plan)}"
        f" | world {plan.world_size} = TP {p.tensor} x PP {p.pipeline} x CP {p.context} x DP "
        f"{dp} | {plan.num_microbatches} microbatches/step | {plan.dtype} on "
        f"{'GPU' if on_gpu else 'CPU'} | {'TE' if plan.use_transformer_engine else 'local'} spec"
        + (f" | FP8 {cfg.train.fp8} ({cfg.train.fp8_format})" if cfg.train.fp8 else "")
        + (f" | resumed from step {state.iteration}" if state.iteration else "")
        + (
            f" | model from {checkpointer.path(iteration)} (weights only: fresh optimizer)"
            if weights_only
            else ""
        )
    )
    run = Run(
        plan, chunks, optimizer, scheduler, stream, eval_batches, checkpointer, reporter, state
    )
    if teacher is not None:
        run.train_forward_step = _distillation_step(cfg, teacher, reporter)
    val_ppl = train(run)
    reporter.summary(cfg.name, run.state.iteration, val_ppl, params)
    return val_ppl
