"""A launcher model config <-> the ``config.json`` fields of ``MegatronCLAForCausalLM``.

Only what both sides can express maps: pre-norm layers of attention and an MLP (GPT, or a ``*-``
hybrid stack: one GPT layer per ``*-`` pair), biases on q/k/v only, RoPE over the whole head
(optionally with Llama 3.1's scaling), any norm epsilon. Anything else is a ``ValueError`` that
says what cannot be mapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron_cla.conversion.qkv_layout import attention_shape
from megatron_cla.serving.architectures import LLAMA3_ROPE_CONSTANTS, MAX_IMPORT_SEQ_LENGTH
from megatron_cla.sharing import KVSharing
from megatron_cla.training.config import HF_MODEL_TYPES, ModelConfig

__all__ = [
    "MODEL_TYPE",
    "NORM_EPS",
    "check_exportable",
    "hf_config_fields",
    "model_config_from_hf",
    "attention_shape",
]

MODEL_TYPE = "megatron_cla"
ARCHITECTURE = "MegatronCLAForCausalLM"
NORM_EPS = 1e-5
"""The norm epsilon of a ``config.json`` that names none (the launcher's default)."""
AUTO_MAP = {
    "AutoConfig": "configuration_megatron_cla.MegatronCLAConfig",
    "AutoModelForCausalLM": "modeling_megatron_cla.MegatronCLAForCausalLM",
}
_NORMS = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}


def _gpt_layers(model: ModelConfig) -> int:
    """Decoder layers of the GPT equivalent; ``ValueError`` for stacks that have none."""
    if model.arch == "gpt":
        return model.num_layers or 4
    pattern = (model.hybrid_layer_pattern or "").replace("|", "")
    if model.arch != "hybrid" or not pattern or pattern != "*-" * (len(pattern) // 2):
        raise ValueError(
            f"model.arch={model.arch!r}, hybrid_layer_pattern={model.hybrid_layer_pattern!r} "
            f"cannot be exported: the Hugging Face model has GPT layers (a '*-' pair each); "
            f"Mamba (M), Gated DeltaNet (G), MoE (E) and unpaired layers have no counterpart"
        )
    return len(pattern) // 2


def check_exportable(model: ModelConfig) -> int:
    """Raise ``ValueError`` unless ``model`` maps to the HF model; returns its layer count."""
    return _gpt_layers(model)


def _head_dim(model: ModelConfig) -> int:
    return model.head_dim or model.hidden_size // model.num_attention_heads


def hf_config_fields(
    model: ModelConfig,
    ffn_hidden_size: int,
    sharing: KVSharing,
    vocab_rows: int,
    tokenizer_vocab: int,
    dtype: str,
) -> dict[str, Any]:
    """``MegatronCLAConfig`` keyword arguments (and the auto_map/architecture entries); the
    special token ids come from the tokenizer."""
    layers = _gpt_layers(model)
    provenance: dict[str, Any] = {"arch": model.arch}
    if model.arch == "hybrid":  # pipeline segments ('|') are a training layout, not the model
        provenance["hybrid_layer_pattern"] = model.hybrid_layer_pattern.replace("|", "")
    if model.hf_architecture is not None:
        provenance["hf_architecture"] = model.hf_architecture
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": dict(AUTO_MAP),
        "vocab_size": vocab_rows,
        "tokenizer_vocab_size": tokenizer_vocab,
        "hidden_size": model.hidden_size,
        "intermediate_size": ffn_hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": _head_dim(model),
        "hidden_act": "silu" if model.swiglu else "gelu",
        "mlp_gated": model.swiglu,
        "norm_type": _NORMS[model.normalization],
        "norm_eps": model.norm_epsilon,
        "qk_norm": model.qk_layernorm,
        "qkv_bias": model.qkv_bias,
        "rope_theta": float(model.rotary_base),
        "rope_llama3_scaling": _llama3_scaling(model.rope_scaling_factor),
        "max_position_embeddings": model.max_position_embeddings or model.seq_length,
        "cla_producer_layers": [p - 1 for p in sharing.producer_layers],
        "tie_word_embeddings": not model.untie_embeddings,
        "initializer_range": model.init_method_std,
        "megatron_cla": provenance,
        "dtype": dtype,
    }


def _llama3_scaling(factor: Optional[float]) -> Optional[dict[str, float]]:
    """Megatron's ``rope_scaling`` (Llama 3.1's, constants fixed) as the config field."""
    if factor is None:
        return None
    return {"factor": float(factor), **LLAMA3_ROPE_CONSTANTS}


def _scaling_factor(scaling: Optional[dict[str, Any]]) -> Optional[float]:
    if scaling is None:
        return None
    for name, want in LLAMA3_ROPE_CONSTANTS.items():
        got = float(scaling.get(name, want))
        _require(got == want, f"rope_llama3_scaling.{name}={got}: Megatron fixes it at {want}")
    return float(scaling["factor"])


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"config.json cannot be mapped to a Megatron model: {problem}")


def _sharing_fields(producers0: list[int], layers: int) -> dict[str, Any]:
    """``cla_share_factor`` when the producers are every S-th layer, else the explicit list."""
    producers = [p + 1 for p in producers0]
    for share in range(1, layers + 1):
        if producers == list(range(1, layers + 1, share)) and layers % share == 0:
            return {"cla_share_factor": share, "cla_producer_layers": None}
    return {"cla_share_factor": 1, "cla_producer_layers": producers}


def _mlp_fields(hf: dict[str, Any]) -> dict[str, Any]:
    act, gated = hf.get("hidden_act", "silu"), hf.get("mlp_gated", True)
    _require(
        (act, gated) in (("silu", True), ("gelu", False)),
        f"hidden_act={act!r} with mlp_gated={gated}: the launcher trains SwiGLU (silu, gated) "
        f"or GeLU (gelu, not gated) MLPs",
    )
    return {"swiglu": gated, "ffn_hidden_size": hf["intermediate_size"]}


def _arch_fields(hf: dict[str, Any], layers: int) -> dict[str, Any]:
    provenance = hf.get("megatron_cla") or {}
    if provenance.get("arch", "gpt") == "gpt":
        return {"arch": "gpt", "num_layers": layers}
    pattern = provenance.get("hybrid_layer_pattern") or "*-" * layers
    _require(
        pattern.replace("|", "") == "*-" * layers,
        f"megatron_cla.hybrid_layer_pattern={pattern!r} does not match num_hidden_layers={layers}",
    )
    return {"arch": "hybrid", "num_layers": None, "hybrid_layer_pattern": pattern}


def _origin(hf: dict[str, Any]) -> Optional[str]:
    """The stock architecture the exported model was imported from, if any."""
    arch = (hf.get("megatron_cla") or {}).get("hf_architecture")
    _require(
        arch is None or arch in HF_MODEL_TYPES,
        f"megatron_cla.hf_architecture={arch!r} is not one of {sorted(HF_MODEL_TYPES)}",
    )
    return arch


def model_config_from_hf(hf: dict[str, Any], seq_length: Optional[int] = None) -> ModelConfig:
    """The launcher's ``ModelConfig`` for a ``config.json`` of ``model_type`` megatron_cla."""
    model_type = hf.get("model_type")
    _require(
        model_type == MODEL_TYPE,
        f"model_type={model_type!r}; only {MODEL_TYPE!r} models (written by "
        f"megatron-cla export-hf) can be imported",
    )
    norm = {v: k for k, v in _NORMS.items()}.get(hf.get("norm_type", "rmsnorm"))
    _require(norm is not None, f"norm_type={hf.get('norm_type')!r} is not rmsnorm/layernorm")
    eps = float(hf.get("norm_eps", NORM_EPS))
    _require(eps > 0, f"norm_eps={eps} must be > 0")
    layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    producers = hf.get("cla_producer_layers")
    producers = list(range(layers)) if producers is None else producers
    positions = int(hf.get("max_position_embeddings", 256))
    theta = float(hf.get("rope_theta", 10000.0))
    _require(theta.is_integer(), f"rope_theta={theta} is not an integer (model.rotary_base)")
    fields = dict(
        **_arch_fields(hf, layers),
        **_mlp_fields(hf),
        **_sharing_fields(producers, layers),
        hidden_size=int(hf["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads", heads)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        seq_length=seq_length or min(positions, MAX_IMPORT_SEQ_LENGTH),
        max_position_embeddings=positions,
        normalization=norm,
        norm_epsilon=eps,
        qk_layernorm=bool(hf.get("qk_norm", False)),
        qkv_bias=bool(hf.get("qkv_bias", False)),
        rotary_base=int(theta),
        rope_scaling_factor=_scaling_factor(hf.get("rope_llama3_scaling")),
        hf_architecture=_origin(hf),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings=not hf.get("tie_word_embeddings", True),
    )
    return dataclasses.replace(ModelConfig(), **fields)
