"""Attention over Megatron's paged KV cache in plain PyTorch, for machines without a GPU.

Megatron-Core's dynamic-batching attention (``Attention.flash_decode_and_prefill``) only exists as
flash-attention CUDA kernels. :class:`PagedAttentionOnCPU` gives CLA's producer and consumer
attention the same computation for CPU tensors: each request's keys and values are gathered from
the paged buffer through its block table and attended causally (bottom-right aligned, as
flash-attention does when queries are the last tokens of the sequence). Tensors on a GPU always
take Megatron's own kernels.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["paged_attention", "PagedAttentionOnCPU"]


def _gather_request_kv(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """``[length, heads, dim]`` of a request from a ``[blocks, block_tokens, heads, dim]`` cache."""
    block_tokens = cache.shape[1]
    used = block_ids[: -(-length // block_tokens)].long()
    return cache[used].reshape(-1, *cache.shape[2:])[:length]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_k: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of packed queries over paged keys/values.

    Args:
        query: ``[tokens, 1, heads, dim]`` (or ``[tokens, heads, dim]``), the queries of all
            requests packed along the first axis; rows past ``cu_seqlens_q[-1]`` are padding.
        key_cache, value_cache: ``[blocks, block_tokens, kv_heads, dim]``.
        cu_seqlens_q: ``[requests + 1]`` cumulative query lengths.
        seqlens_k: ``[requests]`` key lengths (cached tokens including this step's).
        block_table: ``[requests, max_blocks]`` block ids of each request.
        softmax_scale: defaults to ``dim ** -0.5``.

    Returns:
        ``[tokens, 1, heads, dim]``; padding rows are zero.
    """
    q = query.reshape(query.shape[0], *query.shape[-2:])
    heads, dim = q.shape[-2:]
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    starts = cu_seqlens_q.tolist()
    for r, kv_len in enumerate(seqlens_k[: len(starts) - 1].tolist()):
        q_r = q[starts[r] : starts[r + 1]]
        if q_r.shape[0] == 0:
            continue
        k_r = _gather_request_kv(key_cache, block_table[r], kv_len)
        v_r = _gather_request_kv(value_cache, block_table[r], kv_len)
        repeat = heads // k_r.shape[1]
        k_r, v_r = k_r.repeat_interleave(repeat, dim=1), v_r.repeat_interleave(repeat, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_r.float(), k_r.float()) * scale
        # Query i is token kv_len - n_q + i of its sequence: it sees keys up to that position.
        q_pos = torch.arange(kv_len - q_r.shape[0], kv_len, device=q.device)
        hidden = torch.arange(kv_len, device=q.device)[None, :] > q_pos[:, None]
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        out[starts[r] : starts[r + 1]] = torch.einsum("hqk,khd->qhd", probs, v_r.float()).to(
            q.dtype
        )
    return out.unsqueeze(1)


class PagedAttentionOnCPU:
    """Mixin for Megatron ``Attention`` subclasses: dynamic-batching attention for CPU tensors."""

    def flash_decode_and_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        max_seqlen_q: Any,
        max_seqlen_k: Any,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        seqlens_k: torch.Tensor,
        block_table: torch.Tensor,
        is_decode_only: bool,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Megatron's flash kernels on a GPU; :func:`paged_attention` for CPU tensors."""
        if q.is_cuda:
            return super().flash_decode_and_prefill(  # type: ignore[misc]
                q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqlens_k,
                block_table, is_decode_only, *args, **kwargs,
            )  # fmt: skip
        if kwargs.get("softmax_offset") is not None:
            raise NotImplementedError("attention sinks (softmax_offset) on CPU")
        scale = getattr(self, "softmax_scale", None)
        return paged_attention(q, k, v, cu_seqlens_q, seqlens_k, block_table, scale)
