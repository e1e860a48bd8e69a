"""``MegatronCLAForCausalLM`` for vLLM: consumer layers alias their producer's KV cache.

The same architecture as the transformers model (``serving/hf/modeling_megatron_cla.py``),
built from vLLM's tensor-parallel layers. A producer layer's ``Attention`` owns a KV cache; a
consumer layer's ``Attention`` is built with ``kv_sharing_target_layer_name`` = its producer's
attention, so vLLM gives it no cache of its own (the consumer reads the producer's blocks and
writes nothing): the KV cache per token is that of the producer layers only, and vLLM fits S x
as many tokens (blocks, concurrent sequences) into the same memory.

Padded vocabulary rows (Megatron pads the embedding) are masked out of the logits, so vLLM
never samples them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul, get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

__all__ = ["MegatronCLAForCausalLM"]

_STACKED = (  # (vLLM parameter, HF tensor, shard)
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def _norm(config: Any, size: int) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return RMSNorm(size, eps=config.norm_eps)


def rope_parameters(config: Any) -> dict[str, Any]:
    """vLLM's ``get_rope`` parameters: plain RoPE or Llama 3.1's scaling."""
    params = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = getattr(config, "rope_llama3_scaling", None)  # exports before 0.5 lack the field
    if scaling:
        params.update(rope_type="llama3", **scaling)
    return params


def kv_sharing_target(prefix: str, producer: int) -> str:
    """The attention module name of layer ``producer`` next to ``prefix`` (``...layers.N.
    self_attn``), the name vLLM's ``kv_sharing_target_layer_name`` expects."""
    head, _, _ = prefix.rpartition(".layers.")
    return f"{head}.layers.{producer}.self_attn.attn"


class MegatronCLAAttention(nn.Module):
    """A producer (Q, K, V; owns a cache) or a consumer (Q only; aliases the producer's)."""

    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        layer = extract_layer_index(prefix)
        producer = config.cla_kv_source[layer]
        self.produces_kv = producer == layer
        heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden, bias = config.hidden_size, getattr(config, "qkv_bias", False)  # as above
        if self.produces_kv:
            self.qkv_proj = QKVParallelLinear(
                hidden, d, heads, kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj"
            )
        else:
            self.q_proj = ColumnParallelLinear(
                hidden, heads * d, bias=bias, prefix=f"{prefix}.q_proj"
            )
        self.o_proj = RowParallelLinear(heads * d, hidden, bias=False, prefix=f"{prefix}.o_proj")
        tp = self.o_proj.tp_size
        self.local_heads, self.local_kv_heads = heads // tp, max(1, kv_heads // tp)
        self.head_dim = d
        self.q_norm = _norm(config, d) if config.qk_norm else None
        self.k_norm = _norm(config, d) if config.qk_norm and self.produces_kv else None
        self.rotary_emb = get_rope(
            d,
            max_position=config.max_position_embeddings,
            is_neox_style=True,  # rotate-half, as Megatron
            rope_parameters=rope_parameters(config),
        )
        self.attn = Attention(
            self.local_heads,
            d,
            d**-0.5,
            num_kv_heads=self.local_kv_heads,
            cache_config=vllm_config.cache_config,
            kv_sharing_target_layer_name=(
                None if self.produces_kv else kv_sharing_target(prefix, producer)
            ),
            prefix=f"{prefix}.attn",
        )

    def _per_head(self, x: torch.Tensor, heads: int, norm: Optional[nn.Module]) -> torch.Tensor:
        if norm is None:
            return x
        return norm(x.unflatten(-1, (heads, self.head_dim))).flatten(-2)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if not self.produces_kv:
            q, _ = self.q_proj(hidden)
            q, _ = self.rotary_emb(positions, self._per_head(q, self.local_heads, self.q_norm))
            out, _ = self.o_proj(self.attn(q, None, None))
            return out
        qkv, _ = self.qkv_proj(hidden)
        kv_size = self.local_kv_heads * self.head_dim
        q, k, v = qkv.split([self.local_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = self._per_head(q, self.local_heads, self.q_norm)
        k = self._per_head(k, self.local_kv_heads, self.k_norm)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class MegatronCLAMLP(nn.Module):
    """SwiGLU (gate and up fused) or GeLU."""

    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        if config.mlp_gated:
            self.gate_up_proj = MergedColumnParallelLinear(
                hidden, [ffn, ffn], bias=False, prefix=f"{prefix}.gate_up_proj"
            )
            self.act = SiluAndMul() if config.hidden_act == "silu" else GeluAndMul()
        else:
            self.up_proj = ColumnParallelLinear(hidden, ffn, bias=False, prefix=f"{prefix}.up_proj")
            self.act = get_act_fn(config.hidden_act)
        self.down_proj = RowParallelLinear(ffn, hidden, bias=False, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _ = self.gate_up_proj(x) if hasattr(self, "gate_up_proj") else self.up_proj(x)
        out, _ = self.down_proj(self.act(up))
        return out


class MegatronCLADecoderLayer(nn.Module):
    def __init__(self, config: Any, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = MegatronCLAAttention(config, vllm_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.mlp = MegatronCLAMLP(config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MegatronCLAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MegatronCLADecoderLayer(config, vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = _norm(config, config.hidden_size)

    def forward(
        self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, inputs_embeds: Any
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class MegatronCLAForCausalLM(nn.Module):
    """vLLM entry point of the ``MegatronCLAForCausalLM`` architecture."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = MegatronCLAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None and self.config.tokenizer_vocab_size < logits.shape[-1]:
            logits[..., self.config.tokenizer_vocab_size :] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, shard = name, None
            for packed, part, shard_id in _STACKED:
                candidate = name.replace(f".{part}.", f".{packed}.")
                if f".{part}." in name and candidate in params:
                    target, shard = candidate, shard_id
                    break
            if target not in params:
                raise ValueError(f"MegatronCLAForCausalLM has no place for the tensor {name}")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(target)
        return loaded
