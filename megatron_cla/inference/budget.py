"""KV-cache budget of a config on a GPU (``megatron-cla kv-budget``).

For a pretraining config and its no-CLA twin (same model, every layer a producer) it prints the
KV bytes per token, the cache of one sequence at several lengths, and how many sequences of each
length fit next to the weights, and writes a PNG of the longest context that fits per batch size.

The arithmetic is Megatron-Core's paged cache (``DynamicInferenceContext``), per GPU: a block
holds ``block_size`` tokens of K and V for every producer layer of the pipeline stage, for the
KV heads of the TP rank (at least one); the buffer is cut into whole blocks, one of which
Megatron keeps as a dummy; a sequence of L tokens occupies ``ceil(L / block_size)`` blocks.
``tests/test_kv_budget.py`` checks these numbers against contexts the engine really allocates.

    megatron-cla kv-budget --config configs/paper_1b_h128_mqa_cla2.yaml --gpu-mem 80GB
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Optional

from megatron_cla.accounting import (
    DecoderShape,
    decoder_params,
    kv_cache_bytes_per_token,
    mamba_state_bytes,
    params_per_layer,
)
from megatron_cla.sharing import KVSharing
from megatron_cla.training.config import PretrainConfig

__all__ = ["KVBudget", "format_size", "no_cla_twin", "parse_bytes", "plan_budget", "plot", "report"]

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclasses.dataclass(frozen=True)
class KVBudget:
    """The KV cache of one model on one GPU (the most loaded pipeline stage)."""

    name: str
    """Config name."""
    producers: str
    """How many layers produce K/V, e.g. ``10 of 20 layers``."""
    kv_bytes_per_token: int
    """K and V of one token over the whole model (the paper's accounting)."""
    kv_layers_per_gpu: int
    """Producer layers on the most loaded pipeline stage (= Megatron's cache slots)."""
    kv_heads_per_gpu: int
    """KV heads one TP rank caches (replicated when there are fewer heads than ranks)."""
    block_bytes: int
    """One paged-cache block on one GPU."""
    block_size_tokens: int
    """Tokens per block."""
    weight_bytes_per_gpu: int
    """Weights of the most loaded GPU (decoder layers of a stage, one vocab matrix, norms)."""
    buffer_bytes: int
    """What is left for the KV buffer: GPU memory - weights - reserve (0 if none)."""
    total_blocks: int
    """Whole blocks in the buffer (Megatron: at least 2)."""
    state_bytes_per_sequence: int = 0
    """Hybrid models: Mamba state of one sequence on one GPU (fixed, whatever its length);
    Megatron reserves one such state per block."""

    @property
    def usable_blocks(self) -> int:
        """Blocks requests can use (Megatron keeps one dummy block), when Megatron sizes the
        buffer itself (no ``max_requests``: one Mamba state reserved per block)."""
        return max(self.total_blocks - 1, 0)

    def blocks_serving(self, requests: int) -> int:
        """Usable blocks when the engine is built for ``requests`` sequences: Megatron then
        keeps exactly ``requests`` Mamba states and gives the rest of the buffer to KV blocks."""
        state = requests * self.state_bytes_per_sequence
        if not state:
            return self.usable_blocks
        if state >= self.buffer_bytes:
            return 0
        kv_bytes = int(self.buffer_bytes * (1.0 - state / self.buffer_bytes))
        return max(2, kv_bytes // self.block_bytes) - 1

    def blocks_per_sequence(self, length: int) -> int:
        """Blocks a sequence of ``length`` tokens occupies."""
        return math.ceil(length / self.block_size_tokens)

    def sequence_bytes(self, length: int) -> int:
        """Cache of one sequence of ``length`` tokens on one GPU (whole blocks, Mamba state)."""
        return self.blocks_per_sequence(length) * self.block_bytes + self.state_bytes_per_sequence

    def max_sequences(self, length: int) -> int:
        """Sequences of ``length`` tokens that fit at once (engine built for that many)."""
        need = self.blocks_per_sequence(length)
        if not self.state_bytes_per_sequence:
            return self.usable_blocks // need
        low, high = 0, self.buffer_bytes // self.state_bytes_per_sequence
        while low < high:  # the largest n with blocks_serving(n) >= n * need
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.blocks_serving(mid) >= mid * need else (low, mid - 1)
        return low

    def max_context(self, batch: int) -> int:
        """Longest context (tokens, whole blocks) each of ``batch`` sequences can have."""
        return (self.blocks_serving(batch) // batch) * self.block_size_tokens


def parse_bytes(text: str) -> int:
    """``80GB``/``80G``/``80GiB`` (binary units, like ``nvidia-smi``'s MiB) or bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 80GB or 141GB")
    scale = 1024 ** "BKMGT".index((match.group(2) or "B").upper())
    return int(float(match.group(1)) * scale)


def no_cla_twin(cfg: PretrainConfig) -> PretrainConfig:
    """The same model with every layer producing its own K/V."""
    model = dataclasses.replace(cfg.model, cla_share_factor=1, cla_producer_layers=None)
    return dataclasses.replace(cfg, name=f"{cfg.name} (no CLA)", model=model)


def _transformer(cfg: PretrainConfig) -> Any:
    """The run's config as planned for a GPU machine with Transformer Engine."""
    from megatron_cla.training.plan import make_plan

    p = cfg.parallel
    world = p.tensor * p.pipeline * p.context
    return make_plan(cfg, world, on_gpu=True, te_available=True).transformer


def _stage_weights(config: Any, shape: DecoderShape) -> int:
    """Decoder weights (+ one norm per layer) of the most loaded pipeline stage."""
    layout = config.cla_hybrid_layout
    if layout is None:  # GPT: Megatron splits the layers evenly
        norms = shape.hidden * (2 * shape.num_layers + 1)
        return math.ceil((decoder_params(shape) + norms) / config.pipeline_model_parallel_size)
    per_layer = params_per_layer(shape)
    return max(
        sum(per_layer[seg.offset : seg.offset + len(seg.layer_types)])
        + shape.hidden * (len(seg.layer_types) + 1)
        for seg in _segments(config)
    )


def _segments(config: Any) -> list:
    return config.cla_hybrid_layout.segments(config.pipeline_model_parallel_size)


def _stage_kv_layers_and_mamba(config: Any, sharing: KVSharing) -> tuple[int, int]:
    """(producer attention layers, Mamba layers) of the most loaded stage (cache slots)."""
    from megatron_cla.inference.context import local_producer_layers

    layout = config.cla_hybrid_layout
    if layout is None:
        stages = range(config.pipeline_model_parallel_size)
        return max(len(local_producer_layers(config, sharing, rank)) for rank in stages), 0
    counts = [
        (len(layout.segment_producers(sharing, seg)), seg.layer_types.count("M"))
        for seg in _segments(config)
    ]
    return max(c[0] for c in counts), max(c[1] for c in counts)


def _weights_per_gpu(
    cfg: PretrainConfig, config: Any, shape: DecoderShape, padded_vocab: int
) -> int:
    """Parameters of the most loaded GPU: a stage's layers (+ norms) and one vocab matrix
    (two when the embedding is untied and a single stage holds both)."""
    p = cfg.parallel
    vocab_matrices = 2 if cfg.model.untie_embeddings and p.pipeline == 1 else 1
    per_stage = _stage_weights(config, shape)
    return math.ceil((per_stage + vocab_matrices * padded_vocab * shape.hidden) / p.tensor)


def plan_budget(
    cfg: PretrainConfig,
    gpu_bytes: int,
    *,
    vocab_size: int = 32000,
    kv_dtype: str = "bf16",
    weight_dtype: str = "bf16",
    block_size_tokens: int = 256,
    reserve_bytes: int = 0,
    buffer_bytes: Optional[int] = None,
) -> KVBudget:
    """The KV budget of ``cfg`` on a GPU of ``gpu_bytes`` (see the module docstring).

    ``buffer_bytes`` fixes the KV buffer (as Megatron's ``buffer_size_gb`` does) instead of
    deriving it from the GPU memory left next to the weights and the reserve.
    """
    from megatron_cla.training.model import padded_vocab_size

    for what, dtype in (("kv", kv_dtype), ("weight", weight_dtype)):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{what} dtype {dtype!r}: use one of {sorted(DTYPE_BYTES)}")
    config = _transformer(cfg)
    sharing: KVSharing = config.cla_sharing
    shape = DecoderShape.from_config(config, sharing)
    p, element = cfg.parallel, DTYPE_BYTES[kv_dtype]
    layers, mamba_layers = _stage_kv_layers_and_mamba(config, sharing)
    heads = max(shape.groups // p.tensor, 1)
    block_bytes = element * 2 * layers * block_size_tokens * heads * shape.head_dim
    # Megatron keeps Mamba states in the model's dtype, one per request, reserved per block
    state = mamba_state_bytes(shape, p.tensor, DTYPE_BYTES[weight_dtype], mamba_layers)
    weights = _weights_per_gpu(cfg, config, shape, padded_vocab_size(vocab_size, p.tensor))
    weights *= DTYPE_BYTES[weight_dtype]
    if buffer_bytes is None:
        buffer_bytes = max(gpu_bytes - weights - reserve_bytes, 0)
    layout = config.cla_hybrid_layout
    scope = "layers" if layout is None else f"attention layers ({layout.num_layers} layers)"
    return KVBudget(
        name=cfg.name,
        producers=f"{sharing.num_kv_layers} of {sharing.num_layers} {scope}",
        kv_bytes_per_token=kv_cache_bytes_per_token(shape, element),
        kv_layers_per_gpu=layers,
        kv_heads_per_gpu=heads,
        block_bytes=block_bytes,
        block_size_tokens=block_size_tokens,
        weight_bytes_per_gpu=weights,
        buffer_bytes=buffer_bytes,
        total_blocks=max(2, buffer_bytes // (block_bytes + state)),
        state_bytes_per_sequence=state,
    )


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError


def report(budgets: list[KVBudget], lengths: list[int], gpu_bytes: int) -> str:
    """A plain-text table comparing ``budgets`` (the first is the config, the last its twin)."""
    rows = [
        ("K/V producers", [b.producers for b in budgets]),
        ("KV bytes/token (whole model)", [f"{b.kv_bytes_per_token:,}" for b in budgets]),
        (
            "KV layers x heads per GPU",
            [f"{b.kv_layers_per_gpu} x {b.kv_heads_per_gpu}" for b in budgets],
        ),
        ("weights per GPU", [format_size(b.weight_bytes_per_gpu) for b in budgets]),
        ("KV buffer per GPU", [format_size(b.buffer_bytes) for b in budgets]),
        (
            "block (tokens / bytes)",
            [f"{b.block_size_tokens} / {format_size(b.block_bytes)}" for b in budgets],
        ),
        ("usable blocks", [f"{b.usable_blocks:,}" for b in budgets]),
    ]
    if any(b.state_bytes_per_sequence for b in budgets):
        rows.append(
            ("Mamba state per sequence", [format_size(b.state_bytes_per_sequence) for b in budgets])
        )
    for length in lengths:
        rows.append(
            (
                f"cache of one {length:,}-token seq",
                [format_size(b.sequence_bytes(length)) for b in budgets],
            )
        )
    for length in lengths:
        rows.append(
            (
                f"max concurrent {length:,}-token seqs",
                [f"{b.max_sequences(length):,}" for b in budgets],
            )
        )
    width = max(len(r[0]) for r in rows)
    cols = [max(len(b.name), *(len(r[1][i]) for r in rows)) for i, b in enumerate(budgets)]
    lines = [
        f"GPU memory {format_size(gpu_bytes)}",
        " " * width + "  " + "  ".join(b.name.rjust(c) for b, c in zip(budgets, cols, strict=True)),
    ]
    for label, values in rows:
        lines.append(
            label.ljust(width)
            + "  "
            + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        )
    first, last = budgets[0], budgets[-1]
    ratio = f"(KV bytes/token ratio {first.kv_bytes_per_token / last.kv_bytes_per_token:.3f})"
    if any(b.state_bytes_per_sequence for b in budgets):
        longest = max(lengths)
        served = [b.max_sequences(longest) for b in (first, last)]
        if served[1]:
            lines.append(
                f"{first.name} serves {served[0] / served[1]:.2f}x the concurrent "
                f"{longest:,}-token sequences of {last.name} {ratio}"
            )
    elif last.usable_blocks:
        lines.append(
            f"{first.name} fits {first.usable_blocks / last.usable_blocks:.2f}x the tokens of "
            f"{last.name} {ratio}"
        )
    return "\n".join(lines)


def plot(budgets: list[KVBudget], path: Path, max_batch: int = 1024) -> Path:
    """PNG: longest context per sequence vs batch size, one line per budget (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({round(2 ** (i / 4)) for i in range(int(4 * math.log2(max_batch)) + 1)})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for b in budgets:
        points = [(n, b.max_context(n)) for n in batches if b.max_context(n) > 0]
        ax.plot(
            *zip(*points, strict=True),
            marker=".",
            label=f"{b.name}: {b.kv_bytes_per_token:,} B/token",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent sequences",
        ylabel="max context per sequence (tokens)",
    )
    ax.set_title("Paged KV cache that fits next to the weights, per GPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
