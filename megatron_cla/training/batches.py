"""Microbatches for the pipeline schedules, deterministic and resumable by sample count.

Step ``k`` of a run consumes the global samples ``[consumed, consumed + global_batch)`` of the
(already shuffled) ``GPTDataset``; microbatch ``j`` of data-parallel rank ``r`` holds samples
``consumed + j * mbs * dp + r * mbs + [0, mbs)``. The position is fully described by the number of
consumed samples, which checkpoints store, so a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

__all__ = ["BatchStream", "forward_step"]


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


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple:
    """Megatron schedule callback: GPT forward, then mean token loss of the microbatch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss_func(per_token: torch.Tensor) -> tuple:
        total = (per_token.float() * mask).sum()
        count = mask.sum().clamp(min=1.0)
        loss = total / count
        return loss, {"loss_sum_and_tokens": torch.stack([total.detach(), count]).clone()}

    return output, loss_func
