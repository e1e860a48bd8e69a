"""The distillation loss against a plain-PyTorch reference: values and gradients on one rank,
and each tensor-parallel rank's vocabulary slice at TP 2 equal to the same slice of the one-rank
result (the softmaxes span the whole vocabulary)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_cla.testing import model_parallel, run_on_ranks

VOCAB, BATCH, SEQ = 96, 2, 5
WEIGHT, TEMPERATURE = 0.3, 2.0


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(BATCH, SEQ, VOCAB, generator=g) * 3
    teacher = torch.randn(BATCH, SEQ, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return student, teacher, labels


def _reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Per-token (loss, ce, kl, teacher ce) written directly from the definitions."""
    log_q = F.log_softmax(student / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(student.transpose(1, 2), labels, reduction="none")
    teacher_ce = F.cross_entropy(teacher.transpose(1, 2), labels, reduction="none")
    loss = (1 - WEIGHT) * ce + WEIGHT * TEMPERATURE**2 * kl
    return loss, ce, kl, teacher_ce


def _objective_and_grad(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    from megatron_cla.training.distillation import distillation_loss

    student = student.clone().requires_grad_(True)
    parts = distillation_loss(student, teacher.clone(), labels, WEIGHT, TEMPERATURE)
    (parts[0] * weights).sum().backward()
    return [p.detach() for p in parts], student.grad


def _token_weights() -> torch.Tensor:
    return torch.linspace(0.5, 1.5, BATCH * SEQ).view(BATCH, SEQ)


def test_loss_and_gradient_equal_the_reference(single_rank):
    student, teacher, labels = _inputs()
    parts, grad = _objective_and_grad(student, teacher, labels, _token_weights())
    leaf = student.clone().requires_grad_(True)
    expected = _reference(leaf, teacher, labels)
    (expected[0] * _token_weights()).sum().backward()
    for got, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)
    assert float(expected[2].min()) > 0.01  # different models: the KL term is really there


def test_a_student_equal_to_its_teacher_has_zero_kl(single_rank):
    student, _, labels = _inputs()
    parts, _ = _objective_and_grad(student, student, labels, _token_weights())
    torch.testing.assert_close(parts[2], torch.zeros(BATCH, SEQ), atol=1e-6, rtol=0)
    torch.testing.assert_close(parts[1], parts[3])


def distil_on_a_vocabulary_slice() -> dict:
    """One tensor-parallel rank: its slice of the vocabulary, the per-token parts and its slice
    of the gradient."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    with model_parallel(tensor_model_parallel_size=world):
        student, teacher, labels = _inputs()
        part = slice(rank * VOCAB // world, (rank + 1) * VOCAB // world)
        parts, grad = _objective_and_grad(
            student[..., part], teacher[..., part], labels, _token_weights()
        )
    return {"parts": parts, "grad": grad}


@pytest.mark.distributed
def test_tensor_parallel_slices_equal_the_one_rank_result():
    student, teacher, labels = _inputs()
    whole = _reference(student.clone().requires_grad_(True), teacher, labels)
    leaf = student.clone().requires_grad_(True)
    reference = _reference(leaf, teacher, labels)
    (reference[0] * _token_weights()).sum().backward()
    ranks = run_on_ranks(distil_on_a_vocabulary_slice, 2)
    for rank, result in enumerate(ranks):
        for got, want in zip(result["parts"], whole, strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        part = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
        torch.testing.assert_close(result["grad"], leaf.grad[..., part], rtol=1e-5, atol=1e-7)
