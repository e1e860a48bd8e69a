"""Imported stock models go out again: a run whose layers all compute their own K/V is written
as the architecture it came from (no remote code; the source's logits and config), a CLA run as
``MegatronCLAForCausalLM`` with what the imported architectures need (q/k/v biases, Llama 3.1
RoPE scaling, a free head_dim, q/k norms), whose logits are Megatron's and whose cache holds the
producers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_cla.conversion.to_cla import CLATarget
from megatron_cla.data.tokenizer import HF_TOKENIZER_FILES
from megatron_cla.serving.architectures import stock_config_fields
from megatron_cla.serving.export import export_checkpoint
from megatron_cla.serving.importer import import_hf_model
from megatron_cla.testing.distributed import init_process_group_once
from megatron_cla.training.config import ModelConfig
from megatron_cla.training.run_dir import find_checkpoint
from megatron_cla.training.weights import saved_run_config
from tests.hf_helpers import cache_bytes, load_hf, probe_tokens, relative_error, run_logits
from tests.stock_models import (
    VARIANTS,
    VOCAB,
    byte_level_tokenizer,
    sentencepiece_tokenizer,
    stock_model,
)

transformers = pytest.importorskip("transformers")

SAME_FIELDS = (  # config.json fields an export must give back as the source had them
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "use_sliding_window",
)


@pytest.fixture(scope="module", autouse=True)
def world() -> None:
    init_process_group_once()  # import and export run in a one-process world


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory) -> Path:
    return sentencepiece_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    return byte_level_tokenizer(tmp_path_factory)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_import_goes_back_as_its_stock_architecture(variant, hf_tokenizer, tmp_path):
    source = stock_model(tmp_path / "hf", variant, hf_tokenizer)
    run = import_hf_model(source, tmp_path / "run").out
    result = export_checkpoint(run, tmp_path / "out")
    assert not result.needs_remote_code and not list(result.out.glob("*.py"))
    want, got = (json.loads((d / "config.json").read_text()) for d in (source, result.out))
    assert got["architectures"] == want["architectures"] and "auto_map" not in got
    assert {k: got.get(k) for k in SAME_FIELDS} == {k: want.get(k) for k in SAME_FIELDS}
    tokens = probe_tokens(VOCAB)
    auto = transformers.AutoModelForCausalLM
    original = auto.from_pretrained(str(source), dtype=torch.float32)
    exported = auto.from_pretrained(str(result.out), dtype=torch.float32)  # no remote code
    assert type(exported) is type(original)
    assert torch.equal(_logits(exported, tokens), _logits(original, tokens))
    files = [name for name in HF_TOKENIZER_FILES if (source / name).is_file()]
    assert "tokenizer.json" in files
    for name in files:  # the model's own tokenizer, as it came
        assert (result.out / name).read_bytes() == (source / name).read_bytes(), name
    text = "And God said, Let there be light: and there was light. 1234"
    encode = [
        transformers.AutoTokenizer.from_pretrained(str(d)).encode
        for d in (source, run / "tokenizer")
    ]
    assert encode[0](text) == encode[1](text)


def test_a_tokenizer_transformers_would_load_differently_is_refused(spm_tokenizer, tmp_path):
    """transformers loads any Qwen2 model's tokenizer as Qwen2Tokenizer: an import of one that
    came with a SentencePiece model cannot go back as Qwen2ForCausalLM."""
    source = stock_model(tmp_path / "hf", "qwen2-qkv-bias-tied", spm_tokenizer)
    run = import_hf_model(source, tmp_path / "run").out
    with pytest.raises(ValueError) as caught:
        export_checkpoint(run, tmp_path / "out")
    assert str(caught.value).startswith("AutoTokenizer loads this qwen2 model's tokenizer as")
    assert "unset model.hf_architecture to export MegatronCLAForCausalLM" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


CLA_VARIANTS = {  # stock variant -> what its CLA export must carry
    "llama3.1-rope-scaling-untied": "rope_llama3_scaling",
    "qwen2-qkv-bias-tied": "qkv_bias",
    "qwen3-qk-norm-head-dim-32": "qk_norm",
}


@pytest.mark.parametrize("variant", list(CLA_VARIANTS))
def test_a_cla_conversion_goes_out_as_megatron_cla(variant, spm_tokenizer, tmp_path):
    source = stock_model(tmp_path / "hf", variant, spm_tokenizer)
    cla = CLATarget(share_factor=2, kv_init="mean")
    run = import_hf_model(source, tmp_path / "run", cla=cla).out
    result = export_checkpoint(run, tmp_path / "out")
    assert result.needs_remote_code and result.producers == [0, 2]
    model = load_hf(result.out)
    assert getattr(model.config, CLA_VARIANTS[variant])
    assert model.config.megatron_cla["hf_architecture"] == VARIANTS[variant][0].replace(
        "Config", "ForCausalLM"
    )
    tokens = probe_tokens(VOCAB)
    with torch.no_grad():
        out = model(tokens, use_cache=True)
    assert relative_error(out.logits, run_logits(run, tokens)) < 1e-5
    held = cache_bytes(out.cache if hasattr(out, "cache") else out.past_key_values)
    assert [bool(b) for b in held[:3]] == [True, False, True] and not any(held[3:])
    again = import_hf_model(result.out, tmp_path / "again").config.model
    first = saved_run_config(*find_checkpoint(run)).model
    for field in ("qkv_bias", "rope_scaling_factor", "head_dim", "qk_layernorm", "hf_architecture"):
        assert getattr(again, field) == getattr(first, field), field


@pytest.mark.version_independent
@pytest.mark.parametrize(
    "architecture, fields, message",
    [
        ("LlamaForCausalLM", {"qkv_bias": True}, "model {'qkv_bias': True} cannot be written as"),
        ("Qwen2ForCausalLM", {}, "model {'qkv_bias': False} cannot be written as Qwen2"),
        ("Qwen3ForCausalLM", {"normalization": "LayerNorm"}, "model {'normalization': 'Layer"),
        ("LlamaForCausalLM", {"swiglu": False}, "model {'swiglu': False} cannot be written"),
        ("GPT2LMHeadModel", {}, "model.hf_architecture='GPT2LMHeadModel' is not one of"),
    ],
    ids=["llama-bias", "qwen2-no-bias", "qwen3-layernorm", "llama-gelu", "unknown"],
)
def test_a_model_its_architecture_cannot_express_is_refused(architecture, fields, message):
    model = ModelConfig(
        num_layers=2, head_dim=64, ffn_hidden_size=512, hf_architecture=architecture, **fields
    )
    if architecture == "Qwen3ForCausalLM":
        model.qk_layernorm = True
    with pytest.raises(ValueError) as caught:
        stock_config_fields(model, vocab_rows=512, dtype="float32")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
