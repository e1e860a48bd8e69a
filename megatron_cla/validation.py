"""Build-time checks of a CLA setup: unsupported features and pipeline splits.

Everything here runs before any parameter is allocated (from ``CLATransformerConfig.__post_init__``,
from the spec builders and from ``CLATransformerLayer.__init__``) and raises ``ValueError`` naming
the bad values and the fix. Nothing is ever silently switched off.

Plain attention (no consumer layer) needs none of these checks: a model whose sharing has no
consumers behaves exactly like Megatron's stock layer, whatever the features.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Callable, Optional

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_cla._compat import cuda_graph_captures_attention, cuda_graph_scope_field
from megatron_cla.hybrid_layout import HybridLayout, check_hybrid_pipeline
from megatron_cla.sharing import KVSharing

__all__ = [
    "validate_cla_setup",
    "check_pipeline_split",
    "pipeline_chunks",
    "suggest_pipeline_layout",
]

# (config field, predicate on its value, why it cannot be combined with CLA, what to do instead)
_UNSUPPORTED: tuple[tuple[str, Any, str, str], ...] = (
    (
        "multi_latent_attention",
        bool,
        "MLA compresses K/V into a latent that CLA consumers cannot share",
        "set multi_latent_attention=False",
    ),
    (
        "experimental_attention_variant",
        lambda v: v is not None,
        "experimental attention variants (DSA, gated delta net) have no linear_qkv to share",
        "set experimental_attention_variant=None",
    ),
    (
        "heterogeneous_block_specs",
        bool,
        "per-layer configs may give a consumer other head sizes than its producer",
        "use one config for all layers",
    ),
    (
        "fused_single_qkv_rope",
        bool,
        "the fused QKV RoPE kernel expects one fused QKV tensor; consumers have only Q",
        "set fused_single_qkv_rope=False",
    ),
    (
        "attention_output_gate",
        bool,
        "the gated-attention output projection is not implemented for consumers yet",
        "set attention_output_gate=False",
    ),
    (
        "qk_clip",
        bool,
        "QK-clip rescales linear_qkv, which consumers do not have",
        "set qk_clip=False",
    ),
    (
        "flash_decode",
        bool,
        "static flash-decode writes a per-layer cache that consumers must not own",
        "set flash_decode=False",
    ),
    (
        "inference_fuse_tp_communication",
        bool,
        "fused TP inference kernels read linear_qkv's layer norm, which consumers do not have",
        "set inference_fuse_tp_communication=False",
    ),
    (
        "fp8_multi_head_attention",
        bool,
        "FP8 K/V tensors crossing layers are not verified yet",
        "set fp8_multi_head_attention=False",
    ),
    (
        "cpu_offloading",
        bool,
        "TE CPU offloading of K/V shared by several layers is not verified",
        "set cpu_offloading=False",
    ),
    (
        "transformer_impl",
        lambda v: v == "inference_optimized",
        "the inference-optimized layer fuses linear_qkv with communication",
        "use transformer_impl='transformer_engine' or 'local'",
    ),
)

_OFFLOAD_UNSAFE = ("core_attn", "qkv_linear")


def _check_features(
    config: Any, sharing: KVSharing, position: Callable[[int], int] = lambda k: k
) -> None:
    for field, is_bad, why, fix in _UNSUPPORTED:
        value = getattr(config, field, None)
        if value is not None and is_bad(value):
            raise ValueError(
                f"{field}={value!r} cannot be combined with cross-layer attention "
                f"(producers {list(sharing.producer_layers)}): {why}. Fix: {fix}."
            )
    if cuda_graph_captures_attention(config):
        scope = cuda_graph_scope_field(config)
        raise ValueError(
            f"CUDA graphs that capture attention (cuda_graph_impl="
            f"{getattr(config, 'cuda_graph_impl', None)!r}, {scope}="
            f"{getattr(config, scope, None)!r}) are not supported with CLA: a captured consumer "
            f"would replay without its producer's K/V. Fix: cuda_graph_impl='transformer_engine' "
            f"with {scope}=['mlp'], or no CUDA graphs."
        )
    if getattr(config, "fine_grained_activation_offloading", False):
        bad = [m for m in (getattr(config, "offload_modules", None) or []) if m in _OFFLOAD_UNSAFE]
        if bad:
            raise ValueError(
                f"fine-grained activation offloading of {bad} frees the K/V storage that later "
                f"consumer layers still read. Fix: drop {bad} from offload_modules."
            )
    _check_no_rope_groups(config, sharing, position)


def _check_no_rope_groups(config: Any, sharing: KVSharing, position: Callable[[int], int]) -> None:
    """``no_rope_freq`` is indexed by Megatron's layer number; ``position`` maps an attention
    layer to it (the identity for GPT)."""
    freq = getattr(config, "no_rope_freq", None)
    if not freq:
        return
    pattern = (
        freq
        if isinstance(freq, list)
        else [int((i + 1) % freq == 0) for i in range(config.num_layers)]
    )
    for layer in sharing.consumer_layers:
        producer = sharing.producer_of(layer)
        mine, theirs = pattern[position(layer) - 1], pattern[position(producer) - 1]
        if bool(mine) != bool(theirs):
            raise ValueError(
                f"no_rope_freq={freq!r} gives consumer layer {layer} "
                f"{'no ' if mine else ''}RoPE but its producer layer {producer} "
                f"{'no ' if theirs else ''}RoPE; the shared keys carry the "
                f"producer's rotation. Fix: make every group {sharing.describe()} uniform."
            )


def pipeline_chunks(config: Any) -> list[tuple[int, int, int, int]]:
    """(pp_rank, vp_stage, first global 0-based layer, number of layers) for every chunk."""
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    chunks = []
    for vp_stage in range(vp or 1):
        for pp_rank in range(pp):
            stage = vp_stage if vp is not None else None
            if layout is not None and not isinstance(layout, str):
                ids = layout.get_layer_id_list(LayerType.decoder, vp_stage=stage, pp_rank=pp_rank)
                chunks.append((pp_rank, vp_stage, ids[0] if ids else 0, len(ids)))
            else:
                offset = get_transformer_layer_offset(config, stage, pp_rank)
                chunks.append((pp_rank, vp_stage, offset, -1))
    # Without a layout, sizes follow from the next chunk's offset.
    for i, (pp_rank, vp_stage, start, size) in enumerate(chunks):
        if size < 0:
            end = chunks[i + 1][2] if i + 1 < len(chunks) else config.num_layers
            chunks[i] = (pp_rank, vp_stage, start, end - start)
    return chunks


def suggest_pipeline_layout(sharing: KVSharing, pp: int, vp: Optional[int]) -> Optional[str]:
    """A ``pipeline_model_parallel_layout`` whose every chunk starts on a producer, or None.

    Chunks are as even as the producer positions allow.
    """
    n_chunks = pp * (vp or 1)
    starts = [p - 1 for p in sharing.producer_layers]  # 0-based candidate chunk starts
    if len(starts) < n_chunks:
        return None
    chosen = [0]
    for k in range(1, n_chunks):
        target = round(k * sharing.num_layers / n_chunks)
        remaining = n_chunks - k  # chunks still to place, including this one
        options = [
            s for s in starts if s > chosen[-1] and sum(t > s for t in starts) >= remaining - 1
        ]
        chosen.append(min(options, key=lambda s: (abs(s - target), s)))
    bounds = chosen + [sharing.num_layers]
    sizes = [b - a for a, b in pairwise(bounds)]
    parts = [f"t*{n}" if n > 1 else "t" for n in sizes]
    parts[0] = "E" + parts[0]
    parts[-1] = parts[-1] + "L"
    return "|".join(parts)


def check_pipeline_split(config: Any, sharing: KVSharing) -> None:
    """Every pipeline stage and virtual chunk must start on a producer (K/V never cross stages)."""
    if config.pipeline_model_parallel_size <= 1 or not sharing.has_consumers:
        return
    for pp_rank, vp_stage, start, size in pipeline_chunks(config):
        if size > 0 and not sharing.is_producer(start + 1):
            layer = start + 1
            suggestion = suggest_pipeline_layout(
                sharing,
                config.pipeline_model_parallel_size,
                config.virtual_pipeline_model_parallel_size,
            )
            fix = (
                f'pipeline_model_parallel_layout="{suggestion}" (Megatron-LM: '
                f'--pipeline-model-parallel-layout "{suggestion}")'
                if suggestion
                else "fewer pipeline stages or virtual chunks than producer layers"
            )
            chunk = config.virtual_pipeline_model_parallel_size
            where = "" if chunk is None else f" (virtual chunk {vp_stage})"
            raise ValueError(
                f"Pipeline stage {pp_rank}{where} would start at layer "
                f"{layer}, a CLA consumer of layer {sharing.producer_of(layer)}; K/V are not "
                f"sent between pipeline stages, so every stage must start on a producer. "
                f"Groups: {sharing.describe()}. A layout that works: {fix}."
            )


def validate_cla_setup(
    config: Any, sharing: KVSharing, layout: Optional[HybridLayout] = None
) -> None:
    """All build-time checks for a model whose decoder uses ``sharing``.

    ``layout`` is the pattern of a hybrid stack, whose sharing counts attention layers and whose
    pipeline stages are the pattern's segments; None for a GPT decoder.
    """
    if not sharing.has_consumers:
        return
    if layout is None:
        _check_features(config, sharing)
        check_pipeline_split(config, sharing)
        return
    _check_features(config, sharing, layout.layer_number_of)
    check_hybrid_pipeline(
        layout,
        sharing,
        config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size,
        getattr(config, "num_layers_in_first_pipeline_stage", None),
        getattr(config, "num_layers_in_last_pipeline_stage", None),
    )
