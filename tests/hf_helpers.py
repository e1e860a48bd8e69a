"""Helpers of the Hugging Face export/import tests: launcher checkpoints with random weights for
any model variant, and the Megatron logits they give."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megatron_cla.testing.distributed import init_process_group_once, model_parallel
from megatron_cla.training.config import PretrainConfig, load_config

BASE = (
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=1",
    "model.seq_length=64",
    "train.precision=fp32",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
)


SMALL_HF_DECODER = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
"""The transformers config fields of the small stock models the tests build (GQA, 2 groups)."""


def variant_config(run_dir: Path, data_dir: Path, *overrides: str) -> PretrainConfig:
    """The tiny config of a run in ``run_dir`` whose tokenizer lives in ``data_dir``."""
    return load_config(
        None, [*BASE, f"logging.run_dir={run_dir}", f"data.dir={data_dir}", *overrides]
    )


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough for peaked logits, norms away from 1 (so the q/k-norm vs RoPE order
    and the norm weights' mapping both show in the logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                param.copy_(0.08 * noise)


def megatron_model(cfg: PretrainConfig, vocab: int, seed: int = 3) -> torch.nn.Module:
    """The one-process fp32 model of ``cfg`` with random weights (call in a parallel state)."""
    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.run_dir import serving_config

    plan = make_plan(serving_config(asdict(cfg), 1, "fp32"), 1, on_gpu=False)
    model = build_model_chunk(plan, vocab).eval()
    randomise(model, seed)
    return model


def write_random_checkpoint(cfg: PretrainConfig, vocab: int, seed: int = 3) -> torch.Tensor:
    """Save a weights-only launcher checkpoint of ``cfg`` with random weights into its run
    directory; returns the Megatron logits of :func:`probe_tokens`."""
    from megatron_cla.training.checkpoint import Checkpointer, TrainState

    init_process_group_once()
    with model_parallel():
        model = megatron_model(cfg, vocab, seed)
        checkpoints = Checkpointer(Path(cfg.logging.run_dir) / "checkpoints")
        checkpoints.save_weights(TrainState(7, 56), [model], asdict(cfg))
        return megatron_logits(model, probe_tokens(vocab))


def probe_tokens(vocab: int, length: int = 40) -> torch.Tensor:
    return (torch.arange(length) * 37 + 5).remainder(min(vocab, 500))[None]


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        return model(tokens, positions, None).float()


def run_logits(run: Path, tokens: torch.Tensor, **model_overrides: Any) -> torch.Tensor:
    """Megatron logits of a launcher run's newest checkpoint, loaded at TP 1 in fp32
    (``model_overrides`` change the saved model config, e.g. to switch a feature off)."""
    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan
    from megatron_cla.training.run_dir import find_checkpoint, serving_config

    init_process_group_once()
    checkpointer, iteration = find_checkpoint(run)
    saved = checkpointer.saved_run(iteration)["config"]
    saved = {**saved, "model": {**saved["model"], **model_overrides}}
    plan = make_plan(serving_config(saved, 1, "fp32"), 1, on_gpu=False)
    with model_parallel():
        model = build_model_chunk(plan, checkpointer.saved_vocab_size(iteration)).eval()
        checkpointer.load_weights(iteration, [model])
        return megatron_logits(model, tokens)


def run_weights(run: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The GPT-named weights of a run's newest checkpoint (one process, fp32) and their plan."""
    from megatron_cla.training.run_dir import find_checkpoint
    from megatron_cla.training.weights import load_parameters, one_process_config, saved_run_config

    init_process_group_once()
    checkpointer, iteration = find_checkpoint(run)
    cfg = one_process_config(saved_run_config(checkpointer, iteration))
    return load_parameters(cfg, checkpointer, iteration)


def load_hf(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, dtype=torch.float32
    )
    return model.eval()


def cache_bytes(cache: Any) -> list[int]:
    """Bytes of K and V held by every layer of a transformers cache."""
    sizes = []
    for layer in cache.layers:
        tensors = [getattr(layer, name, None) for name in ("keys", "values")]
        sizes.append(sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)))
    return sizes


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def train_hf_tokenizer(texts: list[str], directory: Path, vocab_size: int = 400) -> Path:
    """A Llama-3-style Hugging Face tokenizer (byte-level BPE, ``<|begin_of_text|>`` added to
    every text, ``<|end_of_text|>`` as eos) trained on ``texts``, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)
    fast.save_pretrained(str(directory))
    return Path(directory)
