"""Per-rank save/load with ``megatron.core.dist_checkpointing`` (spawned by ``run_on_ranks``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_cla import get_cla_decoder_block_spec
from megatron_cla.testing import device, model_parallel
from tests.helpers import SEQ, VOCAB, make_batch, tiny_config

MODEL = dict(num_layers=8, cla_share_factor=2, num_query_groups=1)
HYBRID_PATTERN = "*-M*-|*M*-*-"
"""Hybrid model of the checkpoint tests; '|' is kept only when pipelined."""


def _build(tp: int, pp: int, seed: int, arch: str = "gpt") -> torch.nn.Module:
    parallel = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, batch_p2p_comm=False
    )
    torch.manual_seed(seed + 1000 * ps.get_pipeline_model_parallel_rank())
    if arch == "hybrid":
        return _build_hybrid(parallel, seed + 1000 * ps.get_pipeline_model_parallel_rank())
    config = tiny_config(**parallel, **MODEL)
    spec = get_cla_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    ).to(device())


def _build_hybrid(parallel: dict, seed: int) -> torch.nn.Module:
    from tests.hybrid_helpers import build_cla_hybrid, tiny_hybrid_config

    pattern = (
        HYBRID_PATTERN
        if parallel["pipeline_model_parallel_size"] > 1
        else HYBRID_PATTERN.replace("|", "")
    )
    config = tiny_hybrid_config(pattern, cla_share_factor=2, **parallel)
    return build_cla_hybrid(
        config,
        seed=seed,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def _logits(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """Full-vocabulary logits of a fixed batch, on the last pipeline stage (else None)."""
    batch = make_batch(seed=42)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator: Any, m: torch.nn.Module) -> tuple:
        b = next(data_iterator)
        out = m(b["tokens"], b["position_ids"], b["attention_mask"], runtime_gather_output=True)

        def keep(logits: torch.Tensor) -> tuple:
            collected.append(logits.detach().cpu())
            return logits.sum() * 0.0, {}

        return out, keep

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=model,
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=batch["tokens"].shape[0],
            forward_only=True,
        )
    return collected[0] if collected else None


def save(tp: int, pp: int, directory: str, arch: str = "gpt") -> Optional[torch.Tensor]:
    """Build a randomly initialised model, save it, return its logits (last stage)."""
    with model_parallel(tp, pp):
        model = _build(tp, pp, seed=11, arch=arch)
        dist_checkpointing.save(model.sharded_state_dict(), directory)
        return _logits(model)


def load(tp: int, pp: int, directory: str, arch: str = "gpt") -> Optional[torch.Tensor]:
    """Build a differently initialised model, load the checkpoint, return its logits."""
    with model_parallel(tp, pp):
        model = _build(tp, pp, seed=99, arch=arch)
        state = dist_checkpointing.load(model.sharded_state_dict(), directory)
        result = model.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not unexpected and not missing, (missing, unexpected)
        return _logits(model)


def checkpoint_keys(directory: str) -> list[str]:
    """Tensor keys stored in a checkpoint (one rank is enough)."""
    return sorted(dist_checkpointing.load_tensors_metadata(directory).keys())
