"""Models, batches and comparisons for the GPU tests of the Transformer Engine path."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_cla import CLATransformerConfig
from tests import helpers

VOCAB = 512
SEQ = 128
BATCH = 2

GPU_SETTINGS: dict[str, Any] = dict(
    num_layers=4,
    hidden_size=256,
    ffn_hidden_size=512,
    num_attention_heads=4,
    num_query_groups=1,
    kv_channels=64,
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=torch.nn.functional.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bf16=True,
    params_dtype=torch.bfloat16,
    pipeline_dtype=torch.bfloat16,
    cla_share_factor=2,
    masked_softmax_fusion=False,  # the local spec's fused softmax needs Megatron's own kernels
)
"""A 4-layer, hidden-256, bf16 CLA2 MQA model; FP8-friendly sizes (multiples of 16)."""


def gpu_config(**overrides: Any) -> CLATransformerConfig:
    """``CLATransformerConfig`` of :data:`GPU_SETTINGS` with ``overrides``."""
    return CLATransformerConfig(**{**GPU_SETTINGS, **overrides})


def build(config: Any, spec: Any, seed: int = 11) -> GPTModel:
    """A GPTModel with RoPE on the current GPU, parameters drawn from ``seed``."""
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = GPTModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope"
    )
    return model.cuda()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random next-token data; the causal mask is the attention's own (mask type causal)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).cuda()
    return dict(
        tokens=data[:, :-1],
        labels=data[:, 1:],
        position_ids=torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, -1),
    )


def loss_and_grads(model: GPTModel, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`tests.helpers.loss_and_grads` with the attention's own causal mask; the gradients
    as fp32 copies (bf16 norms would blur the relative errors)."""
    loss, grads = helpers.loss_and_grads(model, {**data, "attention_mask": None})
    return loss, {name: grad.float() for name, grad in grads.items()}


_NORM = re.compile(r"decoder\.layers\.(\d+)\.(input_layernorm|pre_mlp_layernorm)\.(weight|bias)$")


def te_name(local_name: str, te_model: GPTModel) -> str:
    """Where a local-spec parameter lives in the TE-spec model (norms are fused into linears)."""
    match = _NORM.match(local_name)
    if match is None:
        return local_name
    layer, norm, kind = int(match[1]), match[2], match[3]
    if norm == "pre_mlp_layernorm":
        return f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_{kind}"
    attention = te_model.decoder.layers[layer].self_attention
    projection = "linear_qkv" if hasattr(attention, "linear_qkv") else "linear_q"
    return f"decoder.layers.{layer}.self_attention.{projection}.layer_norm_{kind}"


def copy_local_into_te(local: GPTModel, te: GPTModel) -> None:
    """Load the local-spec model's weights into the TE-spec model (every TE weight is set)."""
    weights = {te_name(n, te): t for n, t in local.state_dict().items() if "_extra_state" not in n}
    result = te.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys), result.missing_keys


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||."""
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def unfused_te_layer_spec() -> Any:
    """Megatron's TE layer spec with the input norm *outside* the QKV linear (TENorm +
    TEColumnParallelLinear): the layout in which Megatron recomputes the input layernorm and
    calls ``set_for_recompute_input_layernorm`` on the attention."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    stock = get_gpt_layer_with_transformer_engine_spec()
    attention = stock.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, linear_qkv=TEColumnParallelLinear),
    )
    submodules = dataclasses.replace(
        stock.submodules, input_layernorm=TENorm, self_attention=attention
    )
    return dataclasses.replace(stock, submodules=submodules)
