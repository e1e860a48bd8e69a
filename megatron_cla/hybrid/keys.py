"""How a GPT decoder's parameters map onto the equivalent ``*-`` hybrid stack (pure functions).

A GPT layer is attention followed by an MLP; a hybrid stack spells the same model ``*-*-...``:
GPT layer ``i`` (0-based) becomes hybrid layers ``2i`` (``*``: input norm and self-attention)
and ``2i + 1`` (``-`` or ``E``: pre-MLP norm and MLP). Submodule names inside a layer are the
same (Megatron builds both from the same modules), the final norm is ``final_layernorm`` in GPT
and ``final_norm`` in the hybrid stack, and embedding and output layer are shared.

Megatron's own GPT -> hybrid checkpoint translation targets the homogeneous GPT layout and
rejects per-layer (heterogeneous) checkpoints, which every CLA model with consumers has.
"""

from __future__ import annotations

import re

__all__ = ["ATTENTION_PARTS", "hybrid_key_for_gpt_key", "gpt_key_for_hybrid_key"]

ATTENTION_PARTS = ("input_layernorm.", "self_attention.", "self_attn_bda.")
"""Submodule prefixes that belong to the ``*`` half of a GPT layer; the rest is the MLP half."""

_LAYER = re.compile(r"(?P<head>(?:^|.*\.)decoder\.layers\.)(?P<index>\d+)\.(?P<rest>.*)$")
_GPT_FINAL, _HYBRID_FINAL = "decoder.final_layernorm.", "decoder.final_norm."


def hybrid_key_for_gpt_key(key: str) -> str:
    """The hybrid-stack name of a GPT parameter / checkpoint key (unchanged if not a layer)."""
    match = _LAYER.match(key)
    if match is None:
        return key.replace(_GPT_FINAL, _HYBRID_FINAL)
    index, rest = int(match["index"]), match["rest"]
    slot = 2 * index if rest.startswith(ATTENTION_PARTS) else 2 * index + 1
    return f"{match['head']}{slot}.{rest}"


def gpt_key_for_hybrid_key(key: str) -> str:
    """Inverse of :func:`hybrid_key_for_gpt_key` for the keys of a ``*-`` / ``*E`` stack."""
    match = _LAYER.match(key)
    if match is None:
        return key.replace(_HYBRID_FINAL, _GPT_FINAL)
    index, rest = int(match["index"]), match["rest"]
    expect_attention = index % 2 == 0
    if rest.startswith(ATTENTION_PARTS) != expect_attention:
        raise ValueError(
            f"{key!r} is not a key of a '*-' stack: layer {index} should hold the "
            f"{'attention' if expect_attention else 'MLP'} half of GPT layer {index // 2}."
        )
    return f"{match['head']}{index // 2}.{rest}"
