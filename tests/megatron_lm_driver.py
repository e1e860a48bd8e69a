"""Megatron-LM's own training loop (``megatron.training``, shipped in the megatron-core wheel),
driven the way its ``pretrain_gpt.py`` / ``pretrain_hybrid.py`` scripts drive it in 0.19.

The scripts themselves live in the Megatron-LM repository, not in the wheel. Their ``__main__`` is
a few lines over ``megatron.training``: parse Megatron's arguments, build the model config from
them (``gpt_config_from_args`` resolves ``--spec`` and hands the result to ``GPTModelBuilder``,
``hybrid_config_from_args`` to ``HybridModelBuilder``), and call ``pretrain`` with a dataset
provider and a forward step. :func:`pretrain_like_megatron_lm` does exactly that, with a dataset
provider and forward step of our own over Megatron's ``GPTDataset`` (the scripts' versions also
handle SFT, packed sequences, MTP and context parallelism, none of which these tests use).
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import torch


def _datasets(train_val_test_num_samples: list, vp_stage: Any = None) -> tuple:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import get_args

    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend_per_split=[(list(p), None) for p in (args.train_data_path, args.valid_data_path)]
        + [(list(args.valid_data_path), None)],
        path_to_cache=args.data_cache_path,
        tokenizer=build_tokenizer(args),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
    )
    # every rank reads its batches itself (the scripts broadcast them over TP instead)
    return BlendedMegatronDatasetBuilder(
        GPTDataset, train_val_test_num_samples, lambda: True, config
    ).build()


_TRAINING_LOSSES: list[tuple[float, float]] = []
"""(loss sum, tokens) of every training microbatch of this rank, in order."""


def _loss(loss_mask: torch.Tensor, training: bool, per_token: torch.Tensor) -> tuple:
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token.view(-1).float() * mask)
    tokens = mask.sum().detach().to(torch.int)
    if training:
        _TRAINING_LOSSES.append((loss.item(), tokens.item()))
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def _forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in next(data_iterator).items() if torch.is_tensor(v)}
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(_loss, batch["loss_mask"], model.training)


_datasets.is_distributed = True  # type: ignore[attr-defined]


class _TorchSeeingCuda:
    """``torch`` as ``megatron.training.initialize`` sees it on a CPU test machine: its start-up
    assertion ``torch.cuda.is_available()`` passes (the CPU harness serves the rest)."""

    def __init__(self) -> None:
        self.cuda = type("cuda", (), {"__getattr__": lambda _, n: getattr(torch.cuda, n)})()
        self.cuda.is_available = lambda: True

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _prepare_megatron_training() -> None:
    """Two things the scripts get from a Megatron-LM checkout (or a GPU) and a test lacks."""
    # pretrain() runs `make` in megatron/core/datasets to build the dataset helpers; the wheel
    # ships them compiled (helpers_cpp) but not the Makefile.
    import megatron.core.datasets.helpers_cpp  # noqa: F401  (fails loudly if really missing)
    from megatron.training import initialize

    initialize._compile_dependencies = lambda: None
    if not torch.cuda.is_available():
        initialize.torch = _TorchSeeingCuda()


def pretrain_like_megatron_lm(script: str, argv: list[str]) -> dict[int, float]:
    """``script`` (``pretrain_gpt.py`` or ``pretrain_hybrid.py``) with ``argv``, in this rank;
    returns the training loss of every iteration it ran (a single data-parallel rank)."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        hybrid_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    _prepare_megatron_training()
    sys.argv = [script, *argv]
    args = parse_and_validate_args(args_defaults={})
    model_config = (hybrid_config_from_args if "hybrid" in script else gpt_config_from_args)(args)
    _TRAINING_LOSSES.clear()
    pretrain(
        pretrain_cfg_container_from_args(args, model_config),
        _datasets,
        ModelType.encoder_or_decoder,
        _forward_step,
    )
    per_step = args.global_batch_size // args.micro_batch_size  # one data-parallel rank
    steps = [_TRAINING_LOSSES[i : i + per_step] for i in range(0, len(_TRAINING_LOSSES), per_step)]
    start = args.train_iters - len(steps) + 1  # a resumed run ends at train_iters too
    return {start + i: sum(x[0] for x in s) / sum(x[1] for x in s) for i, s in enumerate(steps)}
