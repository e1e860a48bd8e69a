"""The one K/V hand-off of cross-layer attention: Megatron's layer-to-layer ``context`` slot.

What travels
    The producer's keys and values exactly as its core attention consumed them: after the K/V
    projection, K layernorm (if any), RoPE, inference-cache adjustment and THD squeeze. They are
    stacked into **one** tensor ``[2, s, b, ng, hn]`` (``[0]`` = K, ``[1]`` = V; ``ng`` = query
    groups on this tensor-parallel rank). Consumers attend over ``[0]``/``[1]`` views and apply RoPE
    to their queries only, so keys are rotated exactly once. The views are contiguous and reach
    the consumer's core attention (local, or TE's in ``sbhd``) without copies; the stack is the
    one copy per group, the price of handing K and V over as a single autograd-tracked tensor.

How it travels
    ``TransformerLayer.forward`` returns ``(hidden_states, context)`` and ``TransformerBlock``
    passes that ``context`` to the next layer. Under full activation recomputation Megatron's
    checkpoint functions take ``context`` as an explicit input and return it as an output, so a
    consumer in a later checkpoint chunk still differentiates into its producer. This is why the
    hand-off is not a side channel (module attribute, dict, cache object): a side channel filled
    inside one checkpoint chunk and read in another loses the consumer's gradient to the
    producer's K/V projection, silently (see ``tests/test_recompute.py``).

Lifetime
    One forward pass of one microbatch inside one pipeline chunk. The last layer of every group
    returns ``None`` so the tensor is dropped as early as possible and aligned checkpoint chunks
    store nothing extra. ``TransformerBlock`` returns only hidden states, so nothing crosses a
    pipeline stage; :mod:`megatron_cla.validation` guarantees each stage starts on a producer.

Failure mode
    A consumer that receives anything but a producer's stack raises ``RuntimeError``. There is no
    fallback to computing its own K/V: consumers own no K/V weights.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pack_kv", "unpack_kv"]


def _as_sbhd(t: torch.Tensor) -> torch.Tensor:
    # Packed (THD) sequences reach core attention squeezed to [t, ng, hn]; Attention.forward will
    # squeeze dim 1 again in the consumer, so hand over [t, 1, ng, hn].
    return t.unsqueeze(1) if t.dim() == 3 else t


def pack_kv(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Stack a producer's K and V into the hand-off tensor ``[2, s, b, ng, hn]``."""
    key, value = _as_sbhd(key), _as_sbhd(value)
    if key.shape != value.shape:
        raise RuntimeError(
            f"CLA hand-off needs K and V of one shape, got K {tuple(key.shape)} and "
            f"V {tuple(value.shape)} (different key/value head sizes are not supported)."
        )
    return torch.stack((key, value))


def unpack_kv(
    context: Optional[torch.Tensor], *, layer_number: int, producer_layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the hand-off tensor a consumer received into K and V views.

    Raises:
        RuntimeError: if ``context`` is not a producer's K/V stack. This happens when a pipeline
            stage or a custom block starts on a consumer, or when a non-CLA layer sits between
            the producer and the consumer.
    """
    if not isinstance(context, torch.Tensor) or context.dim() != 5 or context.size(0) != 2:
        got = (
            "nothing (context=None)"
            if context is None
            else f"a {type(context).__name__} of shape "
            f"{tuple(context.shape) if isinstance(context, torch.Tensor) else '?'}"
        )
        raise RuntimeError(
            f"CLA consumer layer {layer_number} needs the K/V of its producer layer "
            f"{producer_layer} through `context` (a [2, s, b, ng, hn] tensor) but received "
            f"{got}. Run the layers in order inside one TransformerBlock, and start every "
            f"pipeline stage on a producer. Consumers have no K/V weights to fall back to."
        )
    return context[0], context[1]
