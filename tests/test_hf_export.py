"""Hugging Face export and import: the transformers model computes Megatron's logits for every
architecture variant the launcher trains, its cache holds the producer layers only, and export
-> import -> export is bit-identical. (The trained-model paths - the CLI, greedy generation
against Megatron's engine, fine-tuning an import - are in tests/test_hf_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_cla.serving.export import export_checkpoint
from megatron_cla.serving.importer import import_hf_model
from megatron_cla.testing.distributed import init_process_group_once
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import (
    cache_bytes,
    load_hf,
    probe_tokens,
    relative_error,
    variant_config,
    write_random_checkpoint,
)
from tests.hybrid_helpers import requires_hybrid

TOKENIZER_VOCAB, ROWS = 500, 512  # Megatron pads 500 to 512 rows: 12 rows never generated
VARIANTS = {
    "mqa-cla2-rmsnorm-swiglu-tied": ("model.num_layers=4", "model.cla_share_factor=2"),
    "gqa-cla3-layernorm-gelu-untied-qknorm": (
        "model.num_layers=6",
        "model.num_query_groups=2",
        "model.cla_share_factor=3",
        "model.normalization=LayerNorm",
        "model.swiglu=false",
        "model.untie_embeddings=true",
        "model.qk_layernorm=true",
    ),
    "mha-s1-qknorm": ("model.num_layers=3", "model.num_query_groups=4", "model.qk_layernorm=true"),
    "gqa-keepends-1-2-4": (
        "model.num_layers=5",
        "model.num_query_groups=2",
        "model.cla_producer_layers=[1,2,4]",
        "model.head_dim=32",
    ),
    "gqa-cla2-qkvbias-llama3rope-head48": (  # what imported Qwen2 / Llama 3.1 models need
        "model.num_layers=4",
        "model.num_query_groups=2",
        "model.cla_share_factor=2",
        "model.qkv_bias=true",
        "model.rope_scaling_factor=8.0",
        "model.head_dim=48",
    ),
}
HYBRID = (
    "model.arch=hybrid",
    "model.hybrid_layer_pattern=*-*-*-*-",
    "model.cla_share_factor=2",
    "model.qk_layernorm=true",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    init_process_group_once()
    return prepared_corpus_sample(tmp_path_factory.mktemp("hf_data"), 120, TOKENIZER_VOCAB)


def _export_variant(tmp_path: Path, data_dir: Path, overrides: tuple, dtype: str = "fp32"):
    cfg = variant_config(tmp_path / "run", data_dir, *overrides)
    logits = write_random_checkpoint(cfg, ROWS)
    result = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype)
    return cfg, logits, result


def _check_logits_and_cache(directory: Path, megatron: torch.Tensor, producers: list[int]):
    model = load_hf(directory)
    tokens = probe_tokens(ROWS)
    with torch.no_grad():
        out = model(tokens, use_cache=True)
    assert relative_error(out.logits, megatron) < 1e-5
    config = model.config
    per_producer = 2 * tokens.numel() * config.num_key_value_heads * config.head_dim * 4
    held = cache_bytes(out.cache if hasattr(out, "cache") else out.past_key_values)
    want = [per_producer if i in producers else 0 for i in range(config.num_hidden_layers)]
    assert held[: len(want)] == want and not any(held[len(want) :])
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_model_computes_megatron_logits(variant, data_dir, tmp_path):
    cfg, megatron, result = _export_variant(tmp_path, data_dir, VARIANTS[variant])
    sharing = {  # 0-based producers of each variant
        "mqa-cla2-rmsnorm-swiglu-tied": [0, 2],
        "gqa-cla3-layernorm-gelu-untied-qknorm": [0, 3],
        "mha-s1-qknorm": [0, 1, 2],
        "gqa-keepends-1-2-4": [0, 1, 3],
        "gqa-cla2-qkvbias-llama3rope-head48": [0, 2],
    }[variant]
    assert result.producers == sharing
    model = _check_logits_and_cache(result.out, megatron, sharing)
    for i, layer in enumerate(model.model.layers):  # consumers: query and output projections
        assert hasattr(layer.self_attn, "k_proj") == hasattr(layer.self_attn, "v_proj")
        assert hasattr(layer.self_attn, "k_proj") == (i in sharing)
    assert model.config.vocab_size == ROWS and model.config.tokenizer_vocab_size == 500
    assert model.generation_config.suppress_tokens == list(range(TOKENIZER_VOCAB, ROWS))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) != cfg.model.untie_embeddings


@requires_hybrid
def test_hybrid_checkpoint_exports_as_gpt_layers(data_dir, tmp_path):
    """A '*-' HybridModel is the same network as GPT layers: same logits, same cache."""
    _, megatron, result = _export_variant(tmp_path, data_dir, HYBRID)
    assert result.producers == [0, 2]
    model = _check_logits_and_cache(result.out, megatron, [0, 2])
    assert model.config.megatron_cla == {"arch": "hybrid", "hybrid_layer_pattern": "*-*-*-*-"}


def _same_files(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        (VARIANTS["gqa-cla3-layernorm-gelu-untied-qknorm"], "fp32"),
        (VARIANTS["gqa-keepends-1-2-4"], "bf16"),
        (VARIANTS["gqa-cla2-qkvbias-llama3rope-head48"], "fp32"),
    ],
    ids=["gpt-fp32", "gpt-keepends-bf16", "gpt-qkvbias-llama3rope"],
)
def test_export_import_export_is_bit_identical(overrides, dtype, data_dir, tmp_path):
    _, _, first = _export_variant(tmp_path, data_dir, overrides, dtype)
    imported = import_hf_model(first.out, tmp_path / "imported")
    assert imported.checkpoint == tmp_path / "imported" / "checkpoints" / "iter_0000000"
    second = export_checkpoint(tmp_path / "imported", tmp_path / "hf2", dtype)
    _same_files(first.out, second.out)
    assert imported.config.model.cla_producer_layers == VARIANTS_PRODUCERS.get(overrides)


VARIANTS_PRODUCERS = {VARIANTS["gqa-keepends-1-2-4"]: [1, 2, 4]}


@requires_hybrid
def test_hybrid_round_trip_keeps_the_hybrid_family(data_dir, tmp_path):
    _, _, first = _export_variant(tmp_path, data_dir, HYBRID, "bf16")
    imported = import_hf_model(first.out, tmp_path / "imported")
    model = imported.config.model
    assert (model.arch, model.hybrid_layer_pattern, model.cla_share_factor) == (
        "hybrid",
        "*-*-*-*-",
        2,
    )
    _same_files(first.out, export_checkpoint(tmp_path / "imported", tmp_path / "hf2", "bf16").out)
