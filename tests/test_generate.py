"""``megatron-cla generate`` end to end: a checkpoint written by the pretraining
launcher (at PP 2) served at TP 1 and TP 2 through Megatron's dynamic engine, streamed, and
checked against greedy decoding by full no-cache forwards of the same weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl
from megatron_cla.testing import run_on_ranks
from megatron_cla.training.run_dir import find_checkpoint, serving_config
from tests.commands import run_command
from tests.helpers import greedy_reference, prepared_corpus_sample
from tests.hybrid_helpers import requires_hybrid
from tests.pretrain_worker import HYBRID_RUN, pretrain_on_rank, tiny_overrides

PROMPTS = ["It is a truth universally acknowledged", "And God said"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def trained_run(pp2_gpt_run) -> Path:
    """A tiny CLA2 run trained for 16 steps on 2 pipeline stages (checkpoint at PP 2)."""
    return pp2_gpt_run


@pytest.fixture(scope="module")
def trained_hybrid_run(tmp_path_factory) -> Path:
    """The tiny CLA2 model as a `*-*-|*-*-` HybridModel, trained on 2 pipeline stages."""
    root = tmp_path_factory.mktemp("generate_hybrid")
    prepared_corpus_sample(root, 300, 512)
    pattern = "model.hybrid_layer_pattern=*-*-|*-*-"
    overrides = tiny_overrides(
        root / "run", root / "data", 16, "parallel.pipeline=2", *HYBRID_RUN, pattern
    )
    run_on_ranks(pretrain_on_rank, 2, overrides, timeout=600)
    return root / "run"


def _generate(run: Path, out: Path, nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    args = ["--checkpoint", str(run), "--max-new-tokens", str(NEW_TOKENS), "--json", str(out)]
    args += [a for p in PROMPTS for a in ("--prompt", p)] + list(extra)
    return run_command("generate", *args, nproc=nproc)


def _records(proc: subprocess.CompletedProcess, out: Path) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _passage_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    logits = model(tokens[None], torch.arange(len(tokens))[None], None)
    return torch.nn.functional.cross_entropy(logits[0, :-1], tokens[1:]).item()


def _reference_tokens(run: Path, prompt_tokens: list[list[int]]) -> list[list[int]]:
    """Greedy tokens by full forwards (no KV cache) of the checkpoint's weights at TP 1."""
    from megatron_cla.data.tokenizer import load_tokenizer
    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan

    checkpointer, iteration = find_checkpoint(run)
    saved = checkpointer.saved_run(iteration)
    plan = make_plan(serving_config(saved["config"], 1), 1, on_gpu=False)
    model = build_model_chunk(plan, 512).eval()
    tokenizer = load_tokenizer(Path(saved["config"]["data"]["dir"]) / "tokenizer.model")
    text = next(iter(read_jsonl(EMBEDDED_CORPUS)))["text"]
    passage = torch.tensor(tokenizer.tokenize(text)[:64])
    untrained = _passage_loss(model, passage)
    checkpointer.load_weights(iteration, [model])
    trained = _passage_loss(model, passage)
    assert trained < untrained - 0.5, f"weights not loaded? loss {untrained:.2f} -> {trained:.2f}"
    return [greedy_reference(model, p, NEW_TOKENS) for p in prompt_tokens]


def test_generate_streams_kv_cached_greedy_text(trained_run, tmp_path, single_rank):
    proc = _generate(trained_run, tmp_path / "tp1.json")
    records = _records(proc, tmp_path / "tp1.json")
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(len(r["tokens"]) == NEW_TOKENS for r in records)
    # The first prompt's text is streamed to stdout as it is generated, then the others follow.
    assert proc.stdout.startswith(PROMPTS[0] + records[0]["text"] + "\n")
    assert f"--- prompt 1\n{PROMPTS[1]}{records[1]['text']}" in proc.stdout
    assert "KV cache: 2 producer layer(s) of 4 attention layers" in proc.stderr
    assert "saved at TP 1 x PP 2" in proc.stderr
    reference = _reference_tokens(trained_run, [r["prompt_tokens"] for r in records])
    assert [r["tokens"] for r in records] == reference


def test_generate_at_tensor_parallel_two_matches_one(trained_run, tmp_path):
    one = _records(_generate(trained_run, tmp_path / "tp1.json"), tmp_path / "tp1.json")
    two_proc = _generate(trained_run, tmp_path / "tp2.json", 2)
    two = _records(two_proc, tmp_path / "tp2.json")
    assert "on TP 2" in two_proc.stderr
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]


def test_generate_reports_missing_checkpoint(tmp_path):
    proc = _generate(tmp_path, tmp_path / "out.json")
    assert proc.returncode != 0
    assert f"cannot serve {tmp_path}: no complete checkpoint in {tmp_path}" in proc.stderr


@requires_hybrid
def test_generate_serves_a_hybrid_checkpoint(trained_hybrid_run, tmp_path, single_rank):
    """A HybridModel trained on two '|' segments is served as one stage: the KV cache holds its
    2 producer attention layers, tokens = no-cache greedy. (Hybrid TP 2 serving is covered by
    tests/test_hybrid_inference.py, the TP 2 command by the GPT test above.)"""
    proc = _generate(trained_hybrid_run, tmp_path / "tp1.json")
    records = _records(proc, tmp_path / "tp1.json")
    assert "KV cache: 2 producer layer(s) of 4 attention layers" in proc.stderr
    reference = _reference_tokens(trained_hybrid_run, [r["prompt_tokens"] for r in records])
    assert [r["tokens"] for r in records] == reference
