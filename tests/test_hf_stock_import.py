"""Stock Hugging Face models import exactly: Llama (with Llama 3.1 RoPE scaling), Mistral, Qwen2
(q/k/v biases) and Qwen3 (q/k norms, a free head_dim), tied or untied, saved in fp32 or bf16,
whole or sharded. At S = 1 the imported Megatron model gives transformers' logits (fp32, rel.
error < 1e-5); every config field that cannot be mapped is one line, with nothing written.

The models are small random-weight ones that transformers builds here (no hub access)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_cla.serving.architectures import stock_model_config
from megatron_cla.serving.importer import import_hf_model
from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.distributed import init_process_group_once
from tests.commands import run_command
from tests.hf_helpers import probe_tokens, relative_error, run_logits, run_weights
from tests.pretrain_worker import pretrain_file_on_rank, step_losses
from tests.stock_models import (
    LLAMA31_ROPE,
    SMALL,
    VARIANTS,
    VOCAB,
    sentencepiece_tokenizer,
    stock_model,
    transformers_logits,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory) -> Path:
    return sentencepiece_tokenizer(tmp_path_factory)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_model_gives_transformers_logits(variant, spm_tokenizer, tmp_path):
    source = stock_model(tmp_path / "hf", variant, spm_tokenizer)
    if "sharded" in variant:
        assert (source / "model.safetensors.index.json").is_file()
    result = import_hf_model(source, tmp_path / "run")
    tokens = probe_tokens(VOCAB)
    want = transformers_logits(source, tokens)
    assert relative_error(run_logits(result.out, tokens), want) < 1e-5
    model = result.config.model
    assert model.cla_share_factor == 1 and model.cla_producer_layers is None
    assert model.seq_length == SMALL["max_position_embeddings"]
    if "rope-scaling" in variant:  # the test sees the scaling: without it the logits differ
        assert model.rope_scaling_factor == 8.0
        plain = run_logits(result.out, tokens, rope_scaling_factor=None)
        assert relative_error(plain, want) > 1e-3


def test_an_imported_stock_model_trains_at_tp2_and_generates(spm_tokenizer, tmp_path):
    """The command writes the run; two launcher ranks fine-tune it at TP 2 from the imported
    weights; ``generate`` serves the result."""
    source = stock_model(tmp_path / "hf", "qwen2-qkv-bias-tied", spm_tokenizer)
    run = tmp_path / "run"
    proc = run_command("import-hf", "--model", source, "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {run}/checkpoints/iter_0000000: hf-imported")
    assert not proc.stderr.strip()
    overrides = [f"data.dir={spm_tokenizer.parent}", "parallel.tensor=2", "model.seq_length=64"]
    overrides += ["train.train_iters=2", "train.warmup_iters=0", "logging.log_interval=1"]
    overrides += ["logging.progress_bar=false", "logging.tensorboard=false"]
    run_on_ranks(pretrain_file_on_rank, 2, str(run / "config.yaml"), overrides, timeout=600)
    losses = step_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    out = tmp_path / "generated.json"
    args = ["--checkpoint", run, "--prompt", "And God said", "--max-new-tokens", 5, "--json", out]
    proc = run_command("generate", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(out.read_text())[0]["tokens"]) == 5


def test_import_converts_to_cla_in_one_step(spm_tokenizer, tmp_path):
    """``import-hf --cla-share-factor 2 --query-groups 1`` = the conversion of a plain import."""
    from megatron_cla.conversion.to_cla import convert_parameters

    source = stock_model(tmp_path / "hf", "qwen2-qkv-bias-tied", spm_tokenizer)
    plain = import_hf_model(source, tmp_path / "plain").out
    args = ["--model", source, "--out", tmp_path / "cla", "--cla-share-factor", 2]
    proc = run_command("import-hf", *args, "--query-groups", 1, "--kv-init", "mean")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hf-imported-cla, model.arch gpt, cla_share_factor 2" in proc.stdout
    params, plan = run_weights(plain)
    converted, cla_plan = run_weights(tmp_path / "cla")
    assert cla_plan.transformer.cla_sharing.producer_layers == (1, 3)
    assert cla_plan.config.model.num_query_groups == 1
    sharings = plan.transformer.cla_sharing, cla_plan.transformer.cla_sharing
    want = convert_parameters(params, plan.config.model, *sharings, "mean", 1)
    assert want.keys() == converted.keys()
    assert all(torch.equal(want[k], converted[k]) for k in want)


BASE_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "hidden_act": "silu",
}


@pytest.mark.version_independent
@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 9,
            },
            "config.json sliding_window=9: Megatron's GPT attention has no window",
        ),
        (
            {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": 1},
            "config.json use_sliding_window=True",
        ),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            "config.json layer_types='sliding_attention': every layer must be full attention",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "config.json rope_scaling.rope_type='yarn': Megatron scales RoPE as Llama 3.1 only",
        ),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "high_freq_factor": 8.0}},
            "config.json rope_scaling.high_freq_factor=8.0: Megatron fixes it at 4.0",
        ),
        ({"rope_theta": 10000.5}, "config.json rope_theta=10000.5"),
        ({"partial_rotary_factor": 0.5}, "config.json partial_rotary_factor=0.5"),
        ({"attention_bias": True}, "config.json attention_bias=True: Megatron gives biases"),
        ({"mlp_bias": True}, "config.json mlp_bias=True"),
        ({"hidden_act": "gelu"}, "config.json hidden_act='gelu'"),
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "config.json architectures=['GPT2LMHeadModel']: not one of ['LlamaForCausalLM',",
        ),
        (
            {"architectures": ["LlamaForCausalLM"], "model_type": "mistral"},
            "config.json model_type='mistral': LlamaForCausalLM has 'llama'",
        ),
    ],
    ids=[
        "mistral window",
        "qwen window",
        "sliding layer",
        "yarn",
        "llama3 constants",
        "fractional theta",
        "partial rotary",
        "attention bias",
        "mlp bias",
        "gelu",
        "other architecture",
        "type mismatch",
    ],
)
def test_fields_that_cannot_be_mapped_are_refused(changes, message):
    with pytest.raises(ValueError) as caught:
        stock_model_config({**BASE_LLAMA, **changes})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def _write(directory: Path, config: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_bad_directories_are_refused_before_anything_is_written(spm_tokenizer, tmp_path):
    init_process_group_once()
    gpt2 = _write(tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(
        ValueError, match=r"architectures=\['GPT2LMHeadModel'\], model_type='gpt2': "
    ):
        import_hf_model(gpt2, tmp_path / "out")
    no_tokenizer = _write(tmp_path / "no_tokenizer", BASE_LLAMA)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer \(tokenizer.json or tokenizer"):
        import_hf_model(no_tokenizer, tmp_path / "out")
    tied = stock_model(tmp_path / "tied", "qwen2-qkv-bias-tied", spm_tokenizer)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tied / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(tied / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        import_hf_model(tied, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
