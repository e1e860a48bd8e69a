"""Small random-weight stock Hugging Face models (Llama, Mistral, Qwen2, Qwen3), as transformers
saves them, for the import and export tests (no hub access here)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_cla.data.corpus import EMBEDDED_CORPUS, read_jsonl
from megatron_cla.testing.distributed import init_process_group_once
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import SMALL_HF_DECODER, randomise, train_hf_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = SMALL_HF_DECODER["vocab_size"]  # the test tokenizer has 400 pieces, all with a row
SMALL = dict(**SMALL_HF_DECODER, num_hidden_layers=3, max_position_embeddings=128)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 10000.0,  # long enough wavelengths that the scaling shows in the logits
}
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (config class, fields, how it is saved)
    "llama3.1-rope-scaling-untied": (
        "LlamaConfig",
        dict(rope_parameters=LLAMA31_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False),
        {},
    ),
    "llama-tied-bf16-sharded": (
        "LlamaConfig",
        dict(tie_word_embeddings=True, num_key_value_heads=1),
        dict(dtype=torch.bfloat16, max_shard_size="60KB"),
    ),
    "mistral-no-window-fp16": (
        "MistralConfig",
        dict(sliding_window=None),
        dict(dtype=torch.float16),
    ),
    "qwen2-qkv-bias-tied": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen3-qk-norm-head-dim-32": ("Qwen3Config", dict(head_dim=32), {}),
}


def sentencepiece_tokenizer(tmp_path_factory: Any) -> Path:
    """A SentencePiece model for the imports (its pieces do not matter for the logits); the
    test modules' ``spm_tokenizer`` fixture."""
    init_process_group_once()
    data = prepared_corpus_sample(tmp_path_factory.mktemp("stock_data"), 60, 400)
    return data / "tokenizer.model"


def byte_level_tokenizer(tmp_path_factory: Any) -> Path:
    """A Llama-3-style Hugging Face tokenizer trained on 120 documents of the embedded corpus;
    the test modules' ``hf_tokenizer`` fixture."""
    texts = [doc["text"] for doc in itertools.islice(read_jsonl(EMBEDDED_CORPUS), 120)]
    return train_hf_tokenizer(texts, tmp_path_factory.mktemp("hf_tokenizer"), vocab_size=400)


def stock_model(directory: Path, variant: str, tokenizer: Path) -> Path:
    """Save a random ``variant`` model as transformers does, with ``tokenizer`` (a SentencePiece
    model or a Hugging Face tokenizer directory) beside it."""
    class_name, fields, saving = VARIANTS[variant]
    config = getattr(transformers, class_name)(**{**SMALL, **fields})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed=11)
    model.to(saving.get("dtype", torch.float32))
    shard = {"max_shard_size": saving["max_shard_size"]} if "max_shard_size" in saving else {}
    model.save_pretrained(str(directory), **shard)
    if tokenizer.is_dir():  # a Hugging Face tokenizer, as the model's repository ships it
        for file in tokenizer.iterdir():
            shutil.copyfile(file, directory / file.name)
        if class_name == "Qwen2Config":  # Qwen2's tokenizer class (transformers insists on it)
            settings = json.loads((directory / "tokenizer_config.json").read_text())
            settings["tokenizer_class"] = "Qwen2Tokenizer"
            (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    else:
        shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory


def transformers_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits.float()
