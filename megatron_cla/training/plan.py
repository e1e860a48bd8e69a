"""Everything a run derives from its config, validated before any memory is allocated.

:func:`make_plan` checks the config against the world size and the machine (GPU or not,
Transformer Engine or not), derives the data-parallel size, microbatch count, precision and
backend, and builds the ``CLATransformerConfig`` (whose own validation rejects invalid CLA
settings and pipeline splits). Every problem is a ``ValueError`` naming the values and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_cla._compat import FP8_RECIPES, fp8_recipe_support, transformer_engine_available
from megatron_cla.config import CLATransformerConfig
from megatron_cla.training.config import HF_MODEL_TYPES, PretrainConfig
from megatron_cla.training.uptraining import check_uptrain_settings

__all__ = ["RunPlan", "make_plan"]


@dataclass
class RunPlan:
    """Derived settings of a run."""

    config: PretrainConfig
    world_size: int
    data_parallel: int
    num_microbatches: int
    dtype: torch.dtype
    use_transformer_engine: bool
    on_gpu: bool
    transformer: CLATransformerConfig

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.config.train.global_batch_size * self.config.model.seq_length


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _dtype(precision: str, on_gpu: bool) -> torch.dtype:
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    _require(precision in choices, f"train.precision={precision!r}: use auto, fp32, bf16 or fp16")
    _require(
        on_gpu or precision == "fp32",
        f"train.precision={precision!r} on a CPU: use fp32 (CPU bf16 is >10x slower here)",
    )
    return choices[precision]


def _use_te(setting: str, on_gpu: bool, te_available: Optional[bool]) -> bool:
    _require(
        setting in ("auto", "on", "off"),
        f"train.transformer_engine={setting!r}: use auto, on or off",
    )
    if te_available is None:
        te_available = transformer_engine_available()
    available = te_available and on_gpu
    if setting == "on":
        _require(
            available,
            "train.transformer_engine=on needs a GPU and the transformer_engine "
            "package (pip install megatron-cla[te]); use auto or off",
        )
    return available if setting == "auto" else setting == "on"


def _fp8_settings(cfg: PretrainConfig, dtype: torch.dtype, use_te: bool) -> dict[str, Any]:
    """``TransformerConfig`` FP8 fields for ``train.fp8``; every unsupported setup is rejected."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    if t.fp8 is None:
        return {}
    _require(
        t.fp8 in FP8_RECIPES,
        f"train.fp8={t.fp8!r}: use one of {sorted(FP8_RECIPES)} (or leave it unset)",
    )
    _require(
        t.fp8_format in ("hybrid", "e4m3"),
        f"train.fp8_format={t.fp8_format!r}: use hybrid or e4m3",
    )
    _require(
        use_te,
        f"train.fp8={t.fp8!r} needs Transformer Engine on a GPU (the local spec has no FP8 "
        f"GEMMs); install megatron-cla[te] and set train.transformer_engine=on",
    )
    _require(
        dtype in (torch.bfloat16, torch.float16),
        f"train.fp8={t.fp8!r} with train.precision={t.precision!r}: FP8 runs on top of bf16; "
        f"set train.precision=bf16",
    )
    tokens = t.micro_batch_size * m.seq_length // p.context
    _require(
        tokens % 16 == 0 and m.hidden_size % 16 == 0 and _ffn(m) % 16 == 0,
        f"FP8 GEMMs need multiples of 16: micro_batch_size x seq_length / context = {tokens}, "
        f"hidden_size = {m.hidden_size}, ffn = {_ffn(m)}; adjust them or drop train.fp8",
    )
    supported, reason = fp8_recipe_support(t.fp8)
    _require(
        supported,
        f"train.fp8={t.fp8!r} is not supported here ({reason}); on Hopper use delayed, "
        f"tensorwise or blockwise",
    )
    return dict(fp8=t.fp8_format, fp8_recipe=t.fp8)


def _parallel_sizes(cfg: PretrainConfig, world_size: int) -> tuple[int, int]:
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    _require(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by tensor x pipeline x context = "
        f"{p.tensor} x {p.pipeline} x {p.context}; launch a multiple of {model_parallel} ranks",
    )
    dp = world_size // model_parallel
    per_step = t.micro_batch_size * dp
    _require(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size={t.global_batch_size} must be a multiple of "
        f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} = {per_step}",
    )
    microbatches = t.global_batch_size // per_step
    if p.virtual_pipeline is not None:
        _require(
            microbatches % p.pipeline == 0,
            f"interleaved pipelines need the microbatch count ({microbatches}) to be a "
            f"multiple of parallel.pipeline={p.pipeline}; raise train.global_batch_size",
        )
    return dp, microbatches


def _hybrid_fields(cfg: PretrainConfig, use_te: bool, on_gpu: bool) -> dict[str, Any]:
    """``CLATransformerConfig`` fields of an arch-hybrid model, every misfit rejected."""
    from megatron_cla._compat import hybrid_model_available

    m, p = cfg.model, cfg.parallel
    _require(
        hybrid_model_available(),
        "model.arch=hybrid needs Megatron-Core's HybridModel (megatron-core >= 0.19, Python "
        "3.12); use model.arch=gpt here",
    )
    _require(
        m.hybrid_layer_pattern is not None,
        "model.arch=hybrid needs model.hybrid_layer_pattern, e.g. '*-*-*-*-'",
    )
    from megatron_cla.hybrid_layout import HybridLayout, suggest_hybrid_pattern

    layout = HybridLayout.parse(m.hybrid_layer_pattern)
    types = set(layout.layer_types)
    _require(
        m.num_layers in (None, layout.num_layers),
        f"model.num_layers={m.num_layers} but model.hybrid_layer_pattern has "
        f"{layout.num_layers} layers; leave model.num_layers out for arch hybrid",
    )
    _require(
        p.pipeline_layout is None,
        "parallel.pipeline_layout is GPT-only; mark hybrid pipeline stages with '|' in "
        "model.hybrid_layer_pattern",
    )
    segments = p.pipeline * (p.virtual_pipeline or 1)
    if segments > 1 and "|" not in layout.pattern:
        sharing = layout.sharing(m.cla_share_factor, m.cla_producer_layers)
        fix = suggest_hybrid_pattern(layout, sharing, segments)
        raise ValueError(
            f"parallel.pipeline={p.pipeline} x virtual_pipeline={p.virtual_pipeline or 1} needs "
            f"{segments} '|'-separated segments in model.hybrid_layer_pattern"
            + (f", e.g. model.hybrid_layer_pattern='{fix}'" if fix else "")
        )
    _require(
        not types & {"M", "G"} or (use_te and on_gpu),
        f"model.hybrid_layer_pattern has {sorted(types & {'M', 'G'})} layers: Mamba-2 / Gated "
        f"DeltaNet need Transformer Engine and their CUDA kernels on a GPU; here use '*', '-' "
        f"and 'E' layers",
    )
    _require(
        ("E" in types) == (m.num_experts is not None),
        f"model.num_experts={m.num_experts} with {'E' if 'E' in types else 'no E'} layers in "
        f"model.hybrid_layer_pattern: set it exactly when the pattern has MoE ('E') layers",
    )
    fields: dict[str, Any] = dict(
        num_layers=layout.num_layers,
        hybrid_layer_pattern=layout.pattern,
        mamba_state_dim=m.mamba_state_dim,
        mamba_head_dim=m.mamba_head_dim,
        mamba_num_groups=m.mamba_num_groups,
        mamba_num_heads=m.mamba_num_heads,
    )
    if m.num_experts is not None:
        fields.update(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or _ffn(m),
        )
    return fields


def _architecture(cfg: PretrainConfig, use_te: bool, on_gpu: bool) -> dict[str, Any]:
    """The layer-stack fields of the ``CLATransformerConfig`` for ``model.arch``."""
    m = cfg.model
    _require(m.arch in ("gpt", "hybrid"), f"model.arch={m.arch!r}: use gpt or hybrid")
    _require(
        m.rope_scaling_factor is None or m.rope_scaling_factor >= 1.0,
        f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 (or unset)",
    )
    _require(m.norm_epsilon > 0, f"model.norm_epsilon={m.norm_epsilon} must be > 0")
    _require(
        m.max_position_embeddings is None or m.max_position_embeddings >= m.seq_length,
        f"model.max_position_embeddings={m.max_position_embeddings} is below model.seq_length="
        f"{m.seq_length}; raise it or unset it",
    )
    _require(
        m.hf_architecture is None or (m.hf_architecture in HF_MODEL_TYPES and m.arch == "gpt"),
        f"model.hf_architecture={m.hf_architecture!r} (arch {m.arch}): use one of "
        f"{sorted(HF_MODEL_TYPES)} with arch gpt, or unset it",
    )
    if m.arch == "hybrid":
        _require(
            m.rope_scaling_factor is None,
            "model.rope_scaling_factor: Megatron's HybridModel has no RoPE scaling; use "
            "model.arch=gpt or unset it",
        )
        return _hybrid_fields(cfg, use_te, on_gpu)
    _require(
        m.hybrid_layer_pattern is None and m.num_experts is None,
        "model.hybrid_layer_pattern and model.num_experts need model.arch=hybrid",
    )
    num_layers = 4 if m.num_layers is None else m.num_layers
    _require(num_layers >= 1, f"model.num_layers must be >= 1, got {num_layers}")
    return dict(num_layers=num_layers)


def _ffn(model: Any) -> int:
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.swiglu:
        return 64 * ((8 * model.hidden_size // 3 + 63) // 64)
    return 4 * model.hidden_size


def _transformer_config(
    cfg: PretrainConfig, dtype: torch.dtype, use_te: bool, on_gpu: bool
) -> CLATransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _require(
        m.hidden_size % m.num_attention_heads == 0 or m.head_dim is not None,
        f"model.hidden_size={m.hidden_size} is not divisible by num_attention_heads="
        f"{m.num_attention_heads}; set model.head_dim",
    )
    _require(
        m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_attention_heads={m.num_attention_heads} must be a multiple of "
        f"num_query_groups={m.num_query_groups}",
    )
    _require(
        m.num_attention_heads % p.tensor == 0,
        f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
        f"parallel.tensor={p.tensor}",
    )
    _require(
        not p.sequence_parallel or p.tensor > 1,
        "parallel.sequence_parallel needs parallel.tensor > 1",
    )
    _require(p.context == 1 or use_te, "parallel.context > 1 needs Transformer Engine on a GPU")
    _require(
        not p.distributed_optimizer or use_te or _have_apex(),
        "parallel.distributed_optimizer needs TE or NVIDIA Apex: with Megatron's torch-Adam "
        "fallback its checkpoints cannot be reloaded (megatron-core aliases Adam's step and "
        "raises KeyError 'step' on load); set parallel.distributed_optimizer=false here",
    )
    _require(
        not p.sequence_parallel or use_te or _have_apex(),
        "parallel.sequence_parallel needs TE or NVIDIA Apex norms (Megatron's torch norm "
        "refuses SP); install one of them or set parallel.sequence_parallel=false",
    )
    return CLATransformerConfig(
        **_architecture(cfg, use_te, on_gpu),
        hidden_size=m.hidden_size,
        ffn_hidden_size=_ffn(m),
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        pipeline_model_parallel_layout=p.pipeline_layout,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        use_cpu_initialization=not on_gpu,
        # Megatron's fused softmax needs its own CUDA kernels, which the pip wheel does not ship;
        # TE's attention does its own softmax.
        masked_softmax_fusion=False,
        transformer_impl="transformer_engine" if use_te else "local",
        # gloo pairs batched isend/irecv of the interleaved schedule wrongly; NCCL is fine.
        batch_p2p_comm=on_gpu,
        cla_share_factor=m.cla_share_factor,
        cla_producer_layers=m.cla_producer_layers,
        **_fp8_settings(cfg, dtype, use_te),
    )


def _have_apex() -> bool:
    from megatron.core.models.backends import HAVE_APEX

    return bool(HAVE_APEX)


def make_plan(
    cfg: PretrainConfig,
    world_size: int,
    on_gpu: Optional[bool] = None,
    te_available: Optional[bool] = None,
) -> RunPlan:
    """Validate ``cfg`` for ``world_size`` ranks and derive the run's settings.

    ``on_gpu`` / ``te_available`` default to this machine; planning tools (``megatron-cla
    kv-budget``) pass the GPU machine's.
    """
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    t, log = cfg.train, cfg.logging
    for name, value in [
        ("train.train_iters", t.train_iters),
        ("train.micro_batch_size", t.micro_batch_size),
        ("model.seq_length", cfg.model.seq_length),
        ("logging.log_interval", log.log_interval),
        ("logging.eval_iters", log.eval_iters),
    ]:
        _require(value >= 1, f"{name} must be >= 1, got {value}")
    _require(
        0 <= t.warmup_iters < t.train_iters,
        f"train.warmup_iters={t.warmup_iters} must be in [0, train_iters={t.train_iters}) "
        f"(Megatron's scheduler needs a decay phase); lower warmup_iters",
    )
    _require(
        0 < t.min_lr <= t.lr or t.lr_decay_style == "constant",
        f"train.min_lr={t.min_lr} must be in (0, lr={t.lr}]",
    )
    _require(
        t.max_skipped_steps >= 0,
        f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0 (0 stops at the first "
        f"non-finite step)",
    )
    _require(
        t.lr_decay_style in ("cosine", "linear", "constant"),
        f"train.lr_decay_style={t.lr_decay_style!r}: use cosine, linear or constant",
    )
    check_uptrain_settings(cfg)
    dp, microbatches = _parallel_sizes(cfg, world_size)
    dtype = _dtype(t.precision, on_gpu)
    use_te = _use_te(t.transformer_engine, on_gpu, te_available)
    transformer = _transformer_config(cfg, dtype, use_te, on_gpu)
    return RunPlan(cfg, world_size, dp, microbatches, dtype, use_te, on_gpu, transformer)
