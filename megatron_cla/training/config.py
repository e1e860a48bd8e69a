"""Run configuration of ``megatron-cla pretrain``: YAML -> dataclasses, strictly.

A config file has the sections below (all keys optional; unknown keys are errors). Command-line
overrides use dotted keys, e.g. ``train.lr=1e-3 parallel.tensor=2``; values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "UptrainConfig",
    "PretrainConfig",
    "load_config",
    "HF_MODEL_TYPES",
]

HF_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""The stock Hugging Face architectures import-hf reads and export-hf writes -> their
``model_type``."""


@dataclass
class ModelConfig:
    """The decoder (Llama-like: pre-norm, RoPE, optional SwiGLU, no biases): Megatron's
    ``GPTModel`` or its ``HybridModel``."""

    arch: str = "gpt"
    """``gpt`` (GPTModel: ``num_layers`` attention + MLP layers) or ``hybrid`` (HybridModel over
    ``hybrid_layer_pattern``; megatron-core 0.19+)."""
    hybrid_layer_pattern: Optional[str] = None
    """arch hybrid: one symbol per layer, ``*`` attention, ``-`` MLP, ``E`` MoE, ``M`` Mamba-2,
    ``G`` Gated DeltaNet (the last two need Transformer Engine on a GPU), and ``|`` between the
    ``parallel.pipeline x virtual_pipeline`` pipeline segments. CLA's sharing counts the ``*``
    layers: attention layer 1 is the first ``*``."""
    num_layers: Optional[int] = None
    """Decoder layers; default 4 for arch gpt. arch hybrid takes the pattern's length (another
    value is an error)."""
    hidden_size: int = 256
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 1
    """KV heads: 1 = MQA, num_attention_heads = MHA, in between = GQA."""
    head_dim: Optional[int] = None
    """d_head (Megatron's kv_channels); default hidden_size / num_attention_heads."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; default 4 x hidden (GeLU) or 8/3 x hidden rounded to 64 (SwiGLU)."""
    seq_length: int = 256
    """Training sequence length (tokens)."""
    max_position_embeddings: Optional[int] = None
    """Positions the model is meant to serve (``config.json``'s ``max_position_embeddings`` on
    export; RoPE itself has no limit); default seq_length. import-hf keeps the source model's."""
    swiglu: bool = True
    """Gated SiLU MLP (SwiGLU) instead of GeLU."""
    normalization: str = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm``."""
    qk_layernorm: bool = False
    """Per-head norms on queries and keys."""
    rotary_base: int = 10000
    """RoPE base."""
    rope_scaling_factor: Optional[float] = None
    """Llama 3.1-style RoPE scaling of the long wavelengths by this factor (Megatron's
    ``rope_scaling``, whose other constants are fixed: low/high frequency factors 1 and 4,
    original context 8192); None: plain RoPE. arch gpt only."""
    norm_epsilon: float = 1e-5
    """Epsilon of every RMSNorm/LayerNorm (Megatron's ``layernorm_epsilon``); an imported model
    keeps its own (Qwen: 1e-6)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); no other linear layer has one."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    untie_embeddings: bool = False
    """Separate output layer instead of reusing the input embedding."""
    hf_architecture: Optional[str] = None
    """The stock Hugging Face architecture the model was imported from (import-hf sets it: one
    of ``HF_MODEL_TYPES``). export-hf writes the model back as that architecture (no remote code)
    while every layer computes its own K/V; a CLA model, or None, as ``MegatronCLAForCausalLM``."""
    dropout: float = 0.0
    """Hidden and attention dropout."""
    cla_share_factor: int = 1
    """S: one K/V-producing layer per S (attention) layers (1 = no CLA)."""
    cla_producer_layers: Optional[list[int]] = None
    """Explicit 1-based producer (attention) layers (non-uniform CLA); leave cla_share_factor
    at 1."""
    num_experts: Optional[int] = None
    """arch hybrid: experts of every ``E`` (MoE) layer."""
    moe_router_topk: int = 2
    """Experts each token is routed to (``E`` layers)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of one expert's MLP; default ffn_hidden_size."""
    mamba_state_dim: int = 128
    """Mamba-2 state size per head (``M`` layers)."""
    mamba_head_dim: int = 64
    """Mamba-2 head size."""
    mamba_num_groups: int = 8
    """Mamba-2 B/C groups (a multiple of the tensor-parallel size)."""
    mamba_num_heads: Optional[int] = None
    """Mamba-2 heads; default 2 x hidden_size / mamba_head_dim (Megatron's expand = 2)."""


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism takes the remaining ranks."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: Optional[int] = None
    """Virtual (interleaved) pipeline chunks per stage."""
    context: int = 1
    """Context-parallel size (needs Transformer Engine)."""
    sequence_parallel: bool = False
    """Sequence parallelism (needs tensor > 1, and TE or Apex norms)."""
    pipeline_layout: Optional[str] = None
    """Megatron pipeline_model_parallel_layout string, e.g. ``"Et*3|t*3L"``."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""


@dataclass
class TrainConfig:
    """Optimisation and numerics."""

    train_iters: int = 300
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per microbatch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step (a multiple of micro_batch_size x data-parallel size)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr: float = 2e-4
    """Final learning rate of the decay."""
    warmup_iters: int = 20
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` (Megatron's OptimizerParamScheduler)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient norm is NaN/Inf is skipped (no update; its log line says
    so); this many such steps in a row stop the run with exit status 1 (0: stop at the first)."""
    seed: int = 1234
    """Model-initialisation and dropout seed (data order has its own, data.seed)."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``."""
    transformer_engine: str = "auto"
    """``auto`` (TE specs when installed and on GPU), ``on`` or ``off``."""
    fp8: Optional[str] = None
    """FP8 GEMMs through Transformer Engine with Megatron's recipe ``delayed``, ``tensorwise``
    (current scaling), ``blockwise`` or ``mxfp8`` (Blackwell); None = off. Needs bf16."""
    fp8_format: str = "hybrid"
    """``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3`` (both)."""
    recompute_granularity: Optional[str] = None
    """``full`` or ``selective`` activation recomputation (None: off)."""
    recompute_method: Optional[str] = None
    """``uniform`` or ``block`` (full recompute)."""
    recompute_num_layers: Optional[int] = None
    """Layers per recompute chunk (full recompute)."""


@dataclass
class DataConfig:
    """Training data: a directory made by ``megatron-cla prepare-data``."""

    dir: str = "runs/data/default"
    """Prepared data (tokenizer.model, train/valid .bin/.idx)."""
    inputs: list[str] = field(default_factory=list)
    """JSONL/text files to prepare from when ``dir`` is missing; empty = embedded corpus."""
    vocab_size: int = 8000
    """Tokenizer vocabulary when preparing."""
    tokenizer: Optional[str] = None
    """A SentencePiece model to reuse when preparing (e.g. an imported model's) instead of
    training one; ``dir`` then gets a copy of it."""
    valid_percent: float = 2.0
    """Share of documents held out for validation when preparing."""
    seed: int = 1234
    """Data-order seed (same for every variant of a comparison)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (``megatron.core.dist_checkpointing``)."""

    dir: Optional[str] = None
    """Where to save and resume; default ``<logging.run_dir>/checkpoints``."""
    save_interval: int = 100
    """Save every N steps (and always at the end); 0 = only at the end."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` if there is one."""
    load_iteration: Optional[int] = None
    """Resume from this iteration instead of the newest."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted after a successful save)."""


@dataclass
class LoggingConfig:
    """What a run prints and writes."""

    run_dir: str = "runs/tiny"
    """Logs, metrics, TensorBoard events and (by default) checkpoints go here."""
    log_interval: int = 10
    """Steps between log lines."""
    eval_interval: int = 100
    """Steps between validation-perplexity evaluations (and one at the end)."""
    eval_iters: int = 10
    """Global batches per evaluation (the same held-out batches every time)."""
    eval_at_start: bool = False
    """Also evaluate before the first step of this invocation (e.g. a converted model before
    uptraining); recorded at the step the run starts from."""
    tensorboard: bool = True
    """Write TensorBoard scalars when ``tensorboard`` is installed."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0 when attached to a terminal."""


@dataclass
class UptrainConfig:
    """Continued training of a converted model (``megatron-cla convert to-cla``), optionally
    distilled from the model it came from."""

    trainable: str = "all"
    """``all`` trains every parameter; ``attention`` trains only the attention blocks
    (query/key/value and output projections, q/k norms, biases), as SwiftKV does: everything
    else is frozen and left out of the optimizer."""
    teacher: Optional[str] = None
    """A run directory (or its ``checkpoints``/``iter_`` directory) whose model is the frozen
    teacher, usually the S=1 import the student was converted from. Same vocabulary,
    tokenizer and layer shapes as the student; needs ``parallel.pipeline=1``."""
    kd_weight: float = 0.5
    """α in loss = (1 − α)·cross-entropy + α·T²·KL(teacher ‖ student) (0: no distillation
    term, 1: distillation only)."""
    kd_temperature: float = 2.0
    """T: both models' logits are divided by it inside the KL."""


@dataclass
class PretrainConfig:
    """A complete pretraining run."""

    name: str = "run"
    """Shown in logs and summaries."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    uptrain: UptrainConfig = field(default_factory=UptrainConfig)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads "3e-3" as a string; accept it as the number it means
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads on/off (transformer_engine=on) as bools
    if annotation in (int, float, str, bool) and (
        not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    ):
        raise ValueError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) {[f'{where}{k}' for k in unknown]}; valid keys of "
            f"{where.rstrip('.') or 'the config'}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _check_type(value, hints[name], f"{where}{name}")
    return cls(**kwargs)


def _apply_override(values: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    *sections, leaf = key.strip().split(".")
    node = values
    for section in sections:
        node = node.setdefault(section, {})
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. model.hybrid_layer_pattern=*-*-|*-*- ('*', '|' are YAML syntax)
        node[leaf] = raw


def load_config(path: Optional[Path], overrides: list[str] = ()) -> PretrainConfig:
    """Read ``path`` (YAML; None = all defaults), apply ``overrides``, check keys and types."""
    values: dict = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        _apply_override(values, override)
    return config_from_dict(values)


def config_from_dict(values: dict) -> PretrainConfig:
    """A config from a plain dict (e.g. the one a checkpoint saved), keys and types checked."""
    return _build(PretrainConfig, values, "")
