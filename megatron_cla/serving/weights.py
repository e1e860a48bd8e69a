"""Megatron parameters <-> Hugging Face tensors of ``MegatronCLAForCausalLM`` (pure functions).

The Megatron side is the parameters of a one-process (TP 1, PP 1) model built with the local
spec, named as ``GPTModel`` names them; a ``*-`` hybrid stack is renamed to those names first
(:func:`megatron_cla.hybrid.keys.gpt_key_for_hybrid_key`). Per decoder layer ``i``:

===========================================  ====================================================
Megatron (``decoder.layers.i.``)             Hugging Face (``model.layers.i.``)
===========================================  ====================================================
``input_layernorm.{weight,bias}``            ``input_layernorm.{weight,bias}``
``self_attention.linear_qkv.{weight,bias}``  ``self_attn.{q,k,v}_proj.{weight,bias}`` (producers)
``self_attention.linear_q.{weight,bias}``    ``self_attn.q_proj.{weight,bias}`` (consumers)
``self_attention.linear_proj.weight``        ``self_attn.o_proj.weight``
``self_attention.{q,k}_layernorm.*``         ``self_attn.{q,k}_norm.*``
``pre_mlp_layernorm.*``                      ``post_attention_layernorm.*``
``mlp.linear_fc1.weight``                    ``mlp.gate_proj`` (rows ``[:F]``) + ``mlp.up_proj``
``mlp.linear_fc2.weight``                    ``mlp.down_proj.weight``
===========================================  ====================================================

plus ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight``,
``decoder.final_layernorm.*`` -> ``model.norm.*`` and ``output_layer.weight`` -> ``lm_head.weight``
(untied models only). Megatron's fused QKV rows are grouped per query group:
``view(G, H/G + 2, d, hidden)`` holds the group's H/G query heads, then its key and its value
head (:mod:`megatron_cla.conversion.qkv_layout`). Every conversion is a copy of the same numbers,
so a round trip is bit-identical.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron_cla.conversion.qkv_layout import AttentionShape, join_qkv, split_qkv

__all__ = [
    "AttentionShape",
    "check_hf_names",
    "hf_sources",
    "hf_tensors_from_megatron",
    "megatron_tensor_from_hf",
]

Tensors = dict[str, torch.Tensor]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SIMPLE = {
    "input_layernorm.": "input_layernorm.",
    "self_attention.linear_q.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q.bias": "self_attn.q_proj.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.": "self_attn.q_norm.",
    "self_attention.k_layernorm.": "self_attn.k_norm.",
    "pre_mlp_layernorm.": "post_attention_layernorm.",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_QKV_BIAS = "self_attention.linear_qkv.bias"
_FC1 = "mlp.linear_fc1.weight"


def _fused(shape: AttentionShape) -> dict[str, tuple[list[str], Callable, Callable]]:
    """Megatron suffix -> (HF suffixes, split, join) for the fused projections."""
    split, join = (lambda w: split_qkv(w, shape)), (lambda p: join_qkv(p, shape))
    fused = {
        fused_name: ([f"self_attn.{x}_proj.{kind}" for x in "qkv"], split, join)
        for fused_name, kind in ((_QKV, "weight"), (_QKV_BIAS, "bias"))
    }
    if shape.gated_mlp:
        fc1 = ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        fused[_FC1] = (fc1, lambda w: list(w.chunk(2, dim=0)), lambda p: torch.cat(p, dim=0))
    else:
        fused[_FC1] = (["mlp.up_proj.weight"], lambda w: [w], lambda p: p[0])
    return fused


def _fused_part(name: str, fused: dict) -> Optional[tuple]:
    """The (HF suffixes, split, join) entry of a fused layer parameter, else None."""
    match = _LAYER.match(name)
    return fused.get(match.group(2)) if match else None


def _hf_names(name: str, fused: dict) -> list[str]:
    """The HF tensor(s) a Megatron parameter becomes; ``KeyError`` when it has no counterpart."""
    if name in _TOP:
        return [_TOP[name]]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(name)
    layer, rest = match.groups()
    if rest in fused:
        return [f"model.layers.{layer}.{suffix}" for suffix in fused[rest][0]]
    for megatron, hf in _SIMPLE.items():
        if rest.startswith(megatron):
            return [f"model.layers.{layer}.{hf}{rest[len(megatron) :]}"]
    raise KeyError(name)


def _unmappable(names: list[str]) -> ValueError:
    return ValueError(
        f"these Megatron parameters have no Hugging Face counterpart: {names[:5]}"
        f"{' ...' if len(names) > 5 else ''} (the export maps pre-norm attention + MLP layers "
        f"without biases, MoE or Mamba)"
    )


def hf_tensors_from_megatron(params: Tensors, shape: AttentionShape) -> Tensors:
    """The HF state dict of GPT-named Megatron ``params`` (contiguous copies)."""
    fused, out, bad = _fused(shape), {}, []
    for name, tensor in params.items():
        try:
            targets = _hf_names(name, fused)
        except KeyError:
            bad.append(name)
            continue
        entry = _fused_part(name, fused)
        parts = [tensor] if entry is None else entry[1](tensor)
        for target, part in zip(targets, parts, strict=True):
            out[target] = part.detach().contiguous().clone()
    if bad:
        raise _unmappable(bad)
    return out


def _megatron_tensor(
    name: str, size: torch.Size, parts: list[torch.Tensor], sources: list[str], fused: dict
) -> torch.Tensor:
    """Megatron parameter ``name`` joined from its HF ``parts``; ``ValueError`` unless it has
    exactly the shape ``size`` the model expects."""
    entry = _fused_part(name, fused)
    try:
        tensor = parts[0] if entry is None else entry[2](parts)
    except RuntimeError:  # parts whose sizes cannot be regrouped into this layout
        tensor = None
    if tensor is None or tensor.shape != size:
        shapes = ", ".join(f"{s} {tuple(p.shape)}" for s, p in zip(sources, parts, strict=True))
        raise ValueError(
            f"{shapes} do not give {name} {tuple(size)}: the tensors do not fit config.json"
        )
    return tensor


def hf_sources(names: list[str], shape: AttentionShape) -> dict[str, list[str]]:
    """Megatron parameter -> the HF tensors it is made of; ``ValueError`` naming the parameters
    that have no counterpart."""
    fused, out, bad = _fused(shape), {}, []
    for name in names:
        try:
            out[name] = _hf_names(name, fused)
        except KeyError:
            bad.append(name)
    if bad:
        raise _unmappable(bad)
    return out


def check_hf_names(sources: dict[str, list[str]], available: set[str]) -> None:
    """``ValueError`` for an HF tensor the Megatron model needs and the files lack, or one the
    files have and the model has no place for (``sources`` of the whole model)."""
    for name, parts in sources.items():
        if missing := [s for s in parts if s not in available]:
            raise ValueError(f"the Hugging Face model has no tensor {missing[0]} (for {name})")
    needed = {s for parts in sources.values() for s in parts}
    if unused := sorted(available - needed):
        raise ValueError(
            f"the Hugging Face model has tensors this config has no place for: {unused[:5]}; "
            f"config.json does not describe these weights"
        )


def megatron_tensor_from_hf(
    name: str,
    size: torch.Size,
    sources: list[str],
    read: Callable[[str], torch.Tensor],
    shape: AttentionShape,
) -> torch.Tensor:
    """Megatron parameter ``name`` of shape ``size`` from its HF ``sources``, each read once."""
    parts = [read(s) for s in sources]
    return _megatron_tensor(name, size, parts, sources, _fused(shape))
