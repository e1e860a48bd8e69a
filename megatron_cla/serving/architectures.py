"""Stock Hugging Face decoders (Llama, Mistral, Qwen2, Qwen3) as the launcher's ``ModelConfig``.

All four are Llama-shaped: pre-norm RMSNorm layers, rotary position embeddings over the whole
head (``rotate_half``, as Megatron's RoPE), SwiGLU MLPs without biases, grouped-query attention.
They differ in what Megatron expresses with one setting each:

======================  =======================================================================
``LlamaForCausalLM``    RoPE scaling of type ``llama3`` (3.1, 3.2) -> ``rope_scaling_factor``
``MistralForCausalLM``  nothing beyond Llama, if its ``sliding_window`` is off (``null``)
``Qwen2ForCausalLM``    q/k/v biases -> ``qkv_bias``
``Qwen3ForCausalLM``    per-head q/k RMSNorm before RoPE -> ``qk_layernorm``; free ``head_dim``
======================  =======================================================================

Every ``config.json`` field of these models that changes the computation is mapped exactly or
refused in one line naming the field, its value and why, before any weight is read: an active
sliding window, RoPE scaling other than Llama 3.1's (or with other constants: Megatron fixes
them), partial rotary embeddings, attention or MLP biases beyond Qwen2's, another activation.
The tensor names are those :mod:`megatron_cla.serving.weights` maps.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_cla.training.config import HF_MODEL_TYPES, ModelConfig

__all__ = [
    "STOCK_ARCHITECTURES",
    "MAX_IMPORT_SEQ_LENGTH",
    "stock_architecture",
    "stock_config_fields",
    "stock_model_config",
]

STOCK_ARCHITECTURES = HF_MODEL_TYPES
"""Importable (and exportable) architecture -> its ``model_type``."""
LLAMA3_ROPE_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""The constants Megatron's ``rope_scaling`` fixes (only the factor is a setting)."""
MAX_IMPORT_SEQ_LENGTH = 4096
"""Training sequence length of an imported run when the model allows longer (override it with
``model.seq_length=...``)."""


def stock_architecture(hf: dict[str, Any]) -> Optional[str]:
    """The stock architecture ``config.json`` describes, or None for any other model."""
    names = hf.get("architectures") or []
    arch = names[0] if len(names) == 1 else None
    if arch in STOCK_ARCHITECTURES and hf.get("model_type") == STOCK_ARCHITECTURES[arch]:
        return arch
    return None


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json {field}={value!r}: {why}; the model cannot be imported exactly")


def _rope(hf: dict[str, Any]) -> tuple[int, Optional[float]]:
    """(rotary base, Llama 3.1 scaling factor or None) from transformers 5's ``rope_parameters``
    or the older ``rope_theta`` / ``rope_scaling`` fields."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not theta.is_integer():
        raise _refuse("rope_theta", theta, "Megatron's rotary base is an integer")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse("partial_rotary_factor", partial, "Megatron rotates whole heads here")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return int(theta), None
    if kind != "llama3":
        raise _refuse("rope_scaling.rope_type", kind, "Megatron scales RoPE as Llama 3.1 only")
    for name, want in LLAMA3_ROPE_CONSTANTS.items():
        if float(params.get(name, want)) != want:
            raise _refuse(f"rope_scaling.{name}", params[name], f"Megatron fixes it at {want}")
    return int(theta), float(params["factor"])


def _attention_window(hf: dict[str, Any], arch: str) -> None:
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM" and window is not None:
        if window < int(hf.get("max_position_embeddings", 0)):
            raise _refuse("sliding_window", window, "Megatron's GPT attention has no window")
    if hf.get("use_sliding_window"):
        raise _refuse("use_sliding_window", True, "Megatron's GPT attention has no window")
    windowed = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if windowed:
        raise _refuse("layer_types", windowed[0], "every layer must be full attention")


def _biases(hf: dict[str, Any], arch: str) -> bool:
    """Whether q/k/v carry biases (Qwen2's fixed design); other biases are refused."""
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(field, True, "Megatron gives biases to q/k/v only (add_qkv_bias)")
    return arch == "Qwen2ForCausalLM"


def stock_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The launcher's ``ModelConfig`` for a stock ``config.json`` (see the module docstring)."""
    arch = stock_architecture(hf)
    if arch is None:
        names = hf.get("architectures") or []
        if len(names) == 1 and names[0] in STOCK_ARCHITECTURES:
            want = STOCK_ARCHITECTURES[names[0]]
            raise _refuse("model_type", hf.get("model_type"), f"{names[0]} has {want!r}")
        raise _refuse("architectures", names, f"not one of {sorted(STOCK_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "these models' MLP is SwiGLU (silu)")
    _attention_window(hf, arch)
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    return ModelConfig(
        arch="gpt",
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        seq_length=min(int(hf.get("max_position_embeddings", 2048)), MAX_IMPORT_SEQ_LENGTH),
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qk_layernorm=arch == "Qwen3ForCausalLM",
        qkv_bias=_biases(hf, arch),
        rotary_base=theta,
        rope_scaling_factor=scaling,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        hf_architecture=arch,
    )


_FIXED_FIELDS = {  # what each architecture's config needs besides the shared fields
    "LlamaForCausalLM": {"attention_bias": False, "mlp_bias": False},
    "MistralForCausalLM": {"sliding_window": None},
    "Qwen2ForCausalLM": {"use_sliding_window": False},
    "Qwen3ForCausalLM": {"attention_bias": False, "use_sliding_window": False},
}
_SAME_MATH = (  # the ModelConfig fields an export must keep for the logits to be the run's
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
    "ffn_hidden_size",
    "swiglu",
    "normalization",
    "norm_epsilon",
    "qk_layernorm",
    "qkv_bias",
    "rotary_base",
    "rope_scaling_factor",
    "untie_embeddings",
)


def _rope_parameters(model: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling_factor is not None:
        params.update(rope_type="llama3", factor=float(model.rope_scaling_factor))
        params.update(LLAMA3_ROPE_CONSTANTS)
    return params


def stock_config_fields(model: ModelConfig, vocab_rows: int, dtype: str) -> dict[str, Any]:
    """The ``config.json`` fields of ``model`` (a GPT model whose layers all compute their own
    K/V, ``ffn_hidden_size`` and ``head_dim`` resolved) as its ``model.hf_architecture``.
    ``ValueError`` when that architecture cannot express the model: importing the fields back
    must give the same model (:func:`stock_model_config`)."""
    arch = model.hf_architecture
    if arch not in STOCK_ARCHITECTURES:
        raise ValueError(f"model.hf_architecture={arch!r} is not one of {sorted(HF_MODEL_TYPES)}")
    fields = {
        "architectures": [arch],
        "model_type": STOCK_ARCHITECTURES[arch],
        "vocab_size": vocab_rows,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings or model.seq_length,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": _rope_parameters(model),
        "tie_word_embeddings": not model.untie_embeddings,
        "initializer_range": model.init_method_std,
        "dtype": dtype,
        **_FIXED_FIELDS[arch],
    }
    if model.head_dim != model.hidden_size // model.num_attention_heads:  # else the default
        fields["head_dim"] = model.head_dim
    again = stock_model_config(fields)
    if differing := {
        f: getattr(model, f) for f in _SAME_MATH if getattr(again, f) != getattr(model, f)
    }:
        raise ValueError(
            f"model {differing} cannot be written as {arch} (it has "
            f"{ {f: getattr(again, f) for f in differing} }); unset model.hf_architecture to "
            f"export it as MegatronCLAForCausalLM"
        )
    return fields
