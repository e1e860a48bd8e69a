"""A launcher model config <-> the ``config.json`` fields of ``MegatronCLAForCausalLM``.

Only what both sides can express maps: pre-norm layers of attention and an MLP without biases
(GPT, or a ``*-`` hybrid stack: one GPT layer per ``*-`` pair), RoPE over the whole head,
Megatron's norm epsilon. Anything else is a ``ValueError`` that says what cannot be mapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron_cla.conversion.qkv_layout import attention_shape
from megatron_cla.sharing import KVSharing
from megatron_cla.training.config import ModelConfig

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
    extras = {"qkv_bias": model.qkv_bias, "rope_scaling_factor": model.rope_scaling_factor}
    if set_extras := {k: v for k, v in extras.items() if v not in (False, None)}:
        raise ValueError(
            f"model {set_extras} cannot be exported: MegatronCLAForCausalLM has no q/k/v biases "
            f"and no RoPE scaling"
        )
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
    provenance = {"arch": model.arch}
    if model.arch == "hybrid":  # pipeline segments ('|') are a training layout, not the model
        provenance["hybrid_layer_pattern"] = model.hybrid_layer_pattern.replace("|", "")
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
        "rope_theta": float(model.rotary_base),
        "max_position_embeddings": model.seq_length,
        "cla_producer_layers": [p - 1 for p in sharing.producer_layers],
        "tie_word_embeddings": not model.untie_embeddings,
        "initializer_range": model.init_method_std,
        "megatron_cla": provenance,
        "dtype": dtype,
    }


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
        seq_length=seq_length or int(hf.get("max_position_embeddings", 256)),
        normalization=norm,
        norm_epsilon=eps,
        qk_layernorm=bool(hf.get("qk_norm", False)),
        rotary_base=int(theta),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings=not hf.get("tie_word_embeddings", True),
    )
    return dataclasses.replace(ModelConfig(), **fields)
