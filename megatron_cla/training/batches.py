"""Microbatches for the pipeline schedules, deterministic and resumable by sample count.

Step ``k`` of a run consumes the global samples ``[consumed, consumed + global_batch)`` of the
(already shuffled) ``GPTDataset``; microbatch ``j`` of data-parallel rank ``r`` holds samples
``consumed + j * mbs * dp + r * mbs + [0, mbs)``. The position is fully described by the number of
consumed samples, which checkpoints store, so a resumed run sees exactly the batches an
uninterrupted run would.

With context parallelism every rank of a CP group reads the same microbatch and keeps its share
of the sequence (:func:`context_parallel_shard`), in the load-balanced order Transformer Engine's
ring attention expects.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

__all__ = ["BatchStream", "context_parallel_shard", "forward_step", "shard_for_this_rank"]


class BatchStream:
    """Per-rank microbatches of a map-style dataset of Megatron GPT samples."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        data_parallel_size: int,
        data_parallel_rank: int,
        device: torch.device,
        consumed_samples: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self.mbs, self.dp, self.rank = micro_batch_size, data_parallel_size, data_parallel_rank
        self.device = device
        self.consumed_samples = consumed_samples

    def _microbatch(self, start: int) -> dict[str, torch.Tensor]:
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
        return {
            "tokens": batch["tokens"].long().to(self.device),
            "labels": batch["labels"].long().to(self.device),
            "loss_mask": batch["loss_mask"].float().to(self.device),
            "position_ids": batch["position_ids"].long().to(self.device),
        }

    def step(self, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        """The microbatches of this rank for the next optimizer step; advances the position."""
        base, stride = self.consumed_samples, self.mbs * self.dp
        batches = [
            self._microbatch(base + j * stride + self.rank * self.mbs)
            for j in range(num_microbatches)
        ]
        self.consumed_samples += num_microbatches * stride
        return batches


def context_parallel_shard(
    batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int
) -> dict[str, torch.Tensor]:
    """This context-parallel rank's part of a ``[b, s]`` microbatch.

    The sequence is cut into ``2 * cp_size`` chunks and rank ``r`` keeps chunks ``r`` and
    ``2 * cp_size - 1 - r``, so every rank gets the same causal-attention work (the layout
    Transformer Engine's context-parallel attention and Megatron's RoPE slicing assume).
    """
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        seq = value.size(1)
        if seq % (2 * cp_size):
            raise ValueError(
                f"context parallelism {cp_size} needs the sequence length ({seq}) to be a "
                f"multiple of 2 x {cp_size}; change model.seq_length or parallel.context"
            )
        chunks = value.view(value.size(0), 2 * cp_size, seq // (2 * cp_size), *value.shape[2:])
        index = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=value.device)
        out[key] = chunks.index_select(1, index).reshape(value.size(0), -1, *value.shape[2:])
    return out


def shard_for_this_rank(batch: dict[str, torch.Tensor]) -> dict:
    """This rank's context-parallel share of a microbatch (the whole of it without CP)."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size()
    return context_parallel_shard(batch, ps.get_context_parallel_rank(), size)


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple:
    """Megatron schedule callback: GPT forward, then the token loss of the microbatch.

    The loss function returns ``(loss sum, token count, report)``: Megatron's schedule divides
    by this rank's token count, and the gradient all-reduce averages over data- *and*
    context-parallel ranks, which together give the mean token loss of the global batch.
    """
    batch = shard_for_this_rank(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss_func(per_token: torch.Tensor) -> tuple:
        total = (per_token.float() * mask).sum()
        count = mask.sum()
        report = torch.stack([total.detach(), count]).clone()
        return total, count.to(torch.int), {"loss_sum_and_tokens": report}

    return output, loss_func
