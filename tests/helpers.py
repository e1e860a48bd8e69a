"""Tiny models, batches and comparisons shared by the tests."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_cla import CLATransformerConfig, get_cla_decoder_block_spec
from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl, write_jsonl
from megatron_cla.data.prepare import prepare
from megatron_cla.testing import device

VOCAB = 96
SEQ = 16
BATCH = 2


TINY_SETTINGS: dict[str, Any] = dict(
    num_layers=6,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=1,
    kv_channels=16,
    normalization="RMSNorm",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    use_cpu_initialization=True,
    params_dtype=torch.float32,
    pipeline_dtype=torch.float32,
)
"""A 6-layer, hidden-64 model (MQA by default) that runs in milliseconds on a CPU."""


def tiny_config(**overrides: Any) -> CLATransformerConfig:
    """``CLATransformerConfig`` of :data:`TINY_SETTINGS` with ``overrides``."""
    return CLATransformerConfig(**{**TINY_SETTINGS, **overrides})


def build_gpt(config: Any, spec: Any, seed: int = 7, **kwargs: Any) -> GPTModel:
    """GPTModel with RoPE; parameters and dropout streams drawn from ``seed``."""
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        **kwargs,
    )
    return model.to(device())


def make_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Random tokens with next-token labels, positions and an explicit causal mask."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    return {
        "tokens": data[:, :-1].to(device()),
        "labels": data[:, 1:].to(device()),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, -1).to(device()),
        "attention_mask": torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1).to(device()),
    }


def forward_loss(model: GPTModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token cross entropy of a GPTModel."""
    per_token = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return per_token.float().mean()


def loss_and_grads(
    model: GPTModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter's gradient (by name) after one backward pass."""
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    return loss.detach(), grads


def assert_grads_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: Optional[float] = None
) -> None:
    """Same names; bitwise equal (atol None) or within ``atol`` relative to each tensor's scale."""
    assert sorted(got) == sorted(want)
    bad = []
    for name, g in got.items():
        w = want[name]
        if atol is None:
            ok = torch.equal(g, w)
        else:
            ok = torch.allclose(g, w, rtol=0, atol=atol * max(1.0, w.abs().max().item()))
        if not ok:
            bad.append(f"{name}: max|diff|={(g - w).abs().max().item():.3e}")
    assert not bad, "gradients differ:\n" + "\n".join(bad)


def assert_same_step(got: tuple, want: tuple) -> None:
    """Two ``loss_and_grads`` results agree bit for bit: loss and every gradient."""
    assert got[0].item() == want[0].item(), (got[0].item(), want[0].item())
    assert_grads_equal(got[1], want[1])


def assert_same_model_step(model: Any, reference: Any, batch: dict) -> None:
    """``model`` has ``reference``'s parameter names and initial values, and one training step
    gives the same loss and gradients, bit for bit."""
    pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
    for (name, p), (ref_name, ref) in pairs:
        assert name == ref_name and p.equal(ref), name
    assert_same_step(loss_and_grads(model, batch), loss_and_grads(reference, batch))


def detach_the_handoff(monkeypatch: Any) -> None:
    """Make every CLA layer cut the gradient path through the K/V hand-off (what a side channel
    across checkpoint chunks does), to show that the bitwise checks catch it."""
    from megatron_cla import CLATransformerLayer

    original = CLATransformerLayer._forward_attention

    def detached(self, hidden_states, attention_mask=None, context=None, *args, **kwargs):
        if isinstance(context, torch.Tensor):
            context = context.detach()
        return original(self, hidden_states, attention_mask, context, *args, **kwargs)

    monkeypatch.setattr(CLATransformerLayer, "_forward_attention", detached)


def build_cla_gpt(config: Any, seed: int = 7, **kwargs: Any) -> GPTModel:
    """GPTModel with the local-backend CLA block spec of ``config``."""
    spec = get_cla_decoder_block_spec(config, use_transformer_engine=False)
    return build_gpt(config, spec, seed=seed, **kwargs)


class IdTokenizer:
    """Token ids written as text ("3 14 15"): the tokenizer Megatron's engines need, for tests
    that feed token-id prompts to a model with :data:`VOCAB` tokens."""

    eod = VOCAB - 1
    bos = None
    vocab_size = VOCAB

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: Any, **kwargs: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def greedy_reference(model: GPTModel, tokens: list[int], steps: int) -> list[int]:
    """Greedy continuation by full no-cache forwards: the ground truth for KV-cache decoding."""
    out = list(tokens)
    with torch.no_grad():
        for _ in range(steps):
            n = len(out)
            logits = model(
                torch.tensor([out], device=device()),
                torch.arange(n, device=device()).unsqueeze(0),
                torch.ones(1, 1, n, n, dtype=torch.bool, device=device()).triu(1),
                runtime_gather_output=True,
            )
            out.append(int(logits[0, -1].argmax()))
    return out[len(tokens) :]


def prepared_corpus_sample(root: Path, documents: int, vocab_size: int) -> Path:
    """``root/data``: tokenizer and Megatron datasets of the embedded corpus's first
    ``documents`` documents (5 % held out for validation)."""
    docs = root / "docs.jsonl"
    write_jsonl(itertools.islice(read_jsonl(EMBEDDED_CORPUS), documents), docs)
    prepare([docs], root / "data", vocab_size=vocab_size, valid_percent=5)
    return root / "data"
