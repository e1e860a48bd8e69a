"""Distillation from a frozen teacher on vocab-parallel logits.

Per token, with student logits ``z``, teacher logits ``u``, temperature ``T`` and weight ``α``::

    loss = (1 − α) · CE(z, label) + α · T² · KL(softmax(u / T) ‖ softmax(z / T))

Under tensor parallelism each rank holds a slice of the vocabulary. :func:`vocab_parallel_kl`
computes the softmaxes over the whole vocabulary with two all-reduces (max and sum of
exponentials) and a third for the KL sum, so every rank gets the full per-token KL, and its
backward gives each rank the full KL's gradient with respect to its own slice,
``(softmax(z/T) − softmax(u/T)) / T`` — the same convention as Megatron's
``vocab_parallel_cross_entropy``, whose result is the full cross-entropy on every rank.

:func:`distillation_forward_step` is the schedule callback of a distillation run: the teacher's
forward (no gradients) and the student's on the same microbatch, then the loss above, reporting
the student's cross-entropy, the KL and the teacher's cross-entropy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_kl", "distillation_loss", "distillation_forward_step"]


def _tp_group() -> Optional[Any]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None
    return ps.get_tensor_model_parallel_group()


def _log_softmax(logits: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Log-softmax over a vocabulary split across ``group`` (None: not split)."""
    if group is None:
        return torch.log_softmax(logits, dim=-1)
    top = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    total = shifted.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(total, group=group)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    """KL(softmax(u/T) ‖ softmax(z/T)) per token over a split vocabulary; gradient to ``z``."""

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        group: Optional[Any],
    ) -> torch.Tensor:
        log_q = _log_softmax(student.float() / temperature, group)
        log_p = _log_softmax(teacher.float() / temperature, group)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(dim=-1)
        if group is not None:
            dist.all_reduce(kl, group=group)
        ctx.save_for_backward(log_q.exp(), p)
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple:
        q, p = ctx.saved_tensors
        grad = (q - p) * (grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None


def vocab_parallel_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL(teacher ‖ student) at ``temperature`` of ``[..., vocab / TP]`` logits split
    over Megatron's tensor-parallel group (whole logits without model parallelism); shape
    ``[...]``, the full KL on every rank. Only the student's logits get a gradient."""
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, _tp_group())


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(loss, student cross-entropy, KL, teacher cross-entropy)`` of vocab-parallel
    logits ``[b, s, vocab / TP]`` and labels ``[b, s]``; only ``loss`` carries gradients.

    Like Megatron's ``vocab_parallel_cross_entropy``, which works in place to spare a copy of
    the logits, this overwrites fp32 logits tensors it is given: the KL is taken first."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    kl = vocab_parallel_kl(student_logits, teacher_logits, temperature)
    ce = vocab_parallel_cross_entropy(student_logits.float(), labels)
    with torch.no_grad():
        teacher_ce = vocab_parallel_cross_entropy(teacher_logits.float(), labels)
    loss = (1.0 - kd_weight) * ce + (kd_weight * temperature**2) * kl
    return loss, ce.detach(), kl.detach(), teacher_ce


def distillation_forward_step(
    teacher: torch.nn.Module, kd_weight: float, temperature: float
) -> Callable[[Iterator[dict], torch.nn.Module], tuple]:
    """A Megatron schedule callback like :func:`~megatron_cla.training.batches.forward_step`
    whose loss is :func:`distillation_loss` against ``teacher`` (pipeline parallelism 1).

    The report holds the loss sum and token count (``loss_sum_and_tokens``, the objective) and
    the sums of the student's cross-entropy, the KL and the teacher's cross-entropy
    (``distillation_sums``)."""
    from megatron_cla.training.batches import shard_for_this_rank

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple:
        batch = shard_for_this_rank(next(data_iterator))
        inputs = (batch["tokens"], batch["position_ids"], None)
        with torch.no_grad():
            teacher_logits = teacher(*inputs)
        logits = model(*inputs)
        mask = batch["loss_mask"]

        def loss_func(output: torch.Tensor) -> tuple:
            parts = distillation_loss(
                output, teacher_logits, batch["labels"], kd_weight, temperature
            )
            sums = [(part.float() * mask).sum() for part in parts]
            count = mask.sum()
            report = {
                "loss_sum_and_tokens": torch.stack([sums[0].detach(), count]).clone(),
                "distillation_sums": torch.stack(sums[1:]).detach().clone(),
            }
            return sums[0], count.to(torch.int), report

        return logits, loss_func

    return forward_step
