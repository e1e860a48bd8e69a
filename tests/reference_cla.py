"""An independent plain-PyTorch CLA GPT, written from the paper's description.

It shares no code with ``megatron_cla`` or Megatron: it takes a dict of weights named like a
single-rank Megatron ``GPTModel``'s parameters and computes logits with textbook operations
(batch-first tensors, explicit head loops over groups, explicit causal mask). Tests copy the weights
of a Megatron model in here and compare logits and every parameter gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RefConfig:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    producers: tuple[int, ...]  # 1-based layers that compute K/V
    ffn: int
    vocab: int
    gated: bool = False  # SwiGLU instead of GeLU
    rms_norm: bool = True
    qk_norm: bool = False
    eps: float = 1e-5
    rope_base: float = 10000.0

    @classmethod
    def of(cls, config, vocab: int, gated: bool = False) -> RefConfig:
        """The reference's settings for a Megatron (CLA) config; its producers count
        attention layers, as the config's sharing does."""
        return cls(
            num_layers=config.num_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            groups=config.num_query_groups,
            producers=config.cla_sharing.producer_layers,
            ffn=config.ffn_hidden_size,
            vocab=vocab,
            gated=gated,
            rms_norm=config.normalization == "RMSNorm",
            qk_norm=config.qk_layernorm,
            eps=config.layernorm_epsilon,
        )


def _norm(x, w, b, cfg):
    if cfg.rms_norm:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.eps) * w + b


def _rope(x, base):
    """x: [b, heads, s, d]; rotate the two halves of d (non-interleaved)."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float32, device=x.device), inv)  # [s, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _linear(x, w, name, p):
    bias = p.get(name + ".bias")
    return F.linear(x, w, bias)


def _producer_kv(x, prefix, p, cfg):
    """Split the fused per-group [q.. k v] projection into q [b,h,s,d], k/v [b,g,s,d]."""
    hn = cfg.hidden // cfg.heads
    per_group = cfg.heads // cfg.groups
    out = _linear(x, p[prefix + "linear_qkv.weight"], prefix + "linear_qkv", p)
    b, s, _ = out.shape
    out = out.view(b, s, cfg.groups, (per_group + 2) * hn)
    q = out[..., : per_group * hn].reshape(b, s, cfg.heads, hn)
    k = out[..., per_group * hn : (per_group + 1) * hn]
    v = out[..., (per_group + 1) * hn :]
    if cfg.qk_norm:
        k = _norm(k, p[prefix + "k_layernorm.weight"], p.get(prefix + "k_layernorm.bias"), cfg)
    k = _rope(k.transpose(1, 2), cfg.rope_base)
    return q, k, v.transpose(1, 2)


def _attention(x, prefix, p, cfg, shared):
    hn = cfg.hidden // cfg.heads
    b, s, _ = x.shape
    if shared is None:
        q, k, v = _producer_kv(x, prefix, p, cfg)
    else:
        k, v = shared
        q = _linear(x, p[prefix + "linear_q.weight"], prefix + "linear_q", p).view(
            b, s, cfg.heads, hn
        )
    if cfg.qk_norm:
        q = _norm(q, p[prefix + "q_layernorm.weight"], p.get(prefix + "q_layernorm.bias"), cfg)
    q = _rope(q.transpose(1, 2), cfg.rope_base)  # [b, heads, s, hn]
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
    heads = []
    for h in range(cfg.heads):
        g = h // (cfg.heads // cfg.groups)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hn)
        scores = scores.masked_fill(causal, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, g])
    ctx = torch.cat(heads, -1)  # [b, s, heads*hn], heads in order
    out = _linear(ctx, p[prefix + "linear_proj.weight"], prefix + "linear_proj", p)
    return out, (k, v)


def _mlp(x, prefix, p, cfg):
    h = _linear(x, p[prefix + "linear_fc1.weight"], prefix + "linear_fc1", p)
    if cfg.gated:
        gate, up = h.chunk(2, -1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return _linear(h, p[prefix + "linear_fc2.weight"], prefix + "linear_fc2", p)


def reference_logits(tokens: torch.Tensor, p: dict, cfg: RefConfig) -> torch.Tensor:
    """tokens [b, s] -> logits [b, s, vocab]."""
    x = p["embedding.word_embeddings.weight"][tokens]
    shared = None
    for layer in range(1, cfg.num_layers + 1):
        pre = f"decoder.layers.{layer - 1}."
        is_producer = layer in cfg.producers
        h = _norm(x, p[pre + "input_layernorm.weight"], p.get(pre + "input_layernorm.bias"), cfg)
        out, kv = _attention(h, pre + "self_attention.", p, cfg, None if is_producer else shared)
        if is_producer:
            shared = kv
        x = x + out
        w, b = p[pre + "pre_mlp_layernorm.weight"], p.get(pre + "pre_mlp_layernorm.bias")
        h = _norm(x, w, b, cfg)
        x = x + _mlp(h, pre + "mlp.", p, cfg)
    x = _norm(x, p["decoder.final_layernorm.weight"], p.get("decoder.final_layernorm.bias"), cfg)
    head = p.get("output_layer.weight", p["embedding.word_embeddings.weight"])
    return x @ head.t()


def reference_loss(tokens: torch.Tensor, labels: torch.Tensor, p: dict, cfg: RefConfig):
    """Mean next-token cross entropy, as Megatron's per-token loss averaged."""
    logits = reference_logits(tokens, p, cfg)
    return F.cross_entropy(logits.reshape(-1, cfg.vocab), labels.reshape(-1)), logits


def _stand_in_mixer(x, prefix, p, cfg):
    """The CPU stand-in of the 'M' slot (tests/hybrid_helpers.py), written out again."""
    n = _norm(x, p[prefix + "norm.weight"], p.get(prefix + "norm.bias"), cfg)
    gate = n @ p[prefix + "gate_proj.weight"].t()
    value = n @ p[prefix + "value_proj.weight"].t()
    a = torch.sigmoid(n @ p[prefix + "decay_proj.weight"].t())
    h = torch.zeros_like(value[:, 0])
    states = []
    for t in range(x.shape[1]):  # batch-first: [b, s, inner]
        h = a[:, t] * h + (1 - a[:, t]) * value[:, t]
        states.append(h)
    return x + (F.silu(gate) * torch.stack(states, 1)) @ p[prefix + "out_proj.weight"].t()


def reference_hybrid_logits(tokens: torch.Tensor, p: dict, cfg: RefConfig, pattern: str):
    """tokens [b, s] -> logits of a hybrid stack: '*' attention (``cfg.producers`` count
    attention layers), '-' MLP, 'M' the CPU stand-in mixer; weights named like HybridModel's."""
    x = p["embedding.word_embeddings.weight"][tokens]
    shared, attention = None, 0
    for i, symbol in enumerate(pattern.replace("|", "")):
        pre = f"decoder.layers.{i}."
        if symbol == "*":
            attention += 1
            is_producer = attention in cfg.producers
            w, b = p[pre + "input_layernorm.weight"], p.get(pre + "input_layernorm.bias")
            h = _norm(x, w, b, cfg)
            out, kv = _attention(
                h, pre + "self_attention.", p, cfg, None if is_producer else shared
            )
            shared = kv if is_producer else shared
            x = x + out
        elif symbol == "-":
            w, b = p[pre + "pre_mlp_layernorm.weight"], p.get(pre + "pre_mlp_layernorm.bias")
            x = x + _mlp(_norm(x, w, b, cfg), pre + "mlp.", p, cfg)
        elif symbol == "M":
            x = _stand_in_mixer(x, pre, p, cfg)
        else:
            raise ValueError(f"the reference has no {symbol!r} layer")
    x = _norm(x, p["decoder.final_norm.weight"], p.get("decoder.final_norm.bias"), cfg)
    head = p.get("output_layer.weight", p["embedding.word_embeddings.weight"])
    return x @ head.t()
