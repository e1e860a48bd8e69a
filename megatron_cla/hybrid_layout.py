"""Where the attention layers of a hybrid pattern are and how CLA counts them (pure Python).

``HybridModel`` describes its stack with one symbol per layer (``*`` self-attention, ``-`` MLP,
``E`` MoE, ``M`` Mamba-2, ``G`` Gated DeltaNet; ``|`` separates pipeline segments). Megatron numbers
every symbol as a layer, so in ``*-*-*-*-`` the attention layers are layers 1, 3, 5 and 7.

**CLA counts attention layers only**, in pattern order: attention layer 1 is the first ``*``,
attention layer 2 the second, whatever sits between them. ``cla_share_factor=2`` on ``*-*-*-*-``
therefore makes attention layers 1 and 3 (pattern layers 1 and 5) producers and attention layers 2
and 4 (pattern layers 3 and 7) their consumers; ``cla_producer_layers`` lists attention-layer
numbers too. The K/V of a producer travel through the MLP, MoE, Mamba and GDN slots between it and
its consumers (see :mod:`megatron_cla.hybrid.stack`).

Since K/V never cross a pipeline stage, the first attention layer of every pipeline segment (a
``|``-delimited part of the pattern, or Megatron's even split when there is no ``|``) must be a
producer; :func:`check_hybrid_pipeline` rejects other splits and proposes a pattern that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Optional

from megatron_cla.sharing import KVSharing

__all__ = [
    "ATTENTION",
    "HybridLayout",
    "HybridSegment",
    "check_hybrid_pipeline",
    "suggest_hybrid_pattern",
]

ATTENTION, MLP, MOE, MAMBA, GDN = "*", "-", "E", "M", "G"
DSA, MLA, PIPE, MTP_SEPARATOR = "D", "+", "|", "/"
PASS_THROUGH = frozenset({MLP, MOE, MAMBA, GDN})
"""Slots the K/V hand-off passes through unchanged."""


@dataclass(frozen=True)
class HybridSegment:
    """The layers one pipeline stage (or virtual chunk) builds."""

    pp_rank: int
    """Pipeline rank that builds the segment."""
    vp_stage: Optional[int]
    """Virtual pipeline chunk (None without virtual pipelining)."""
    offset: int
    """Pattern layers before the segment (Megatron's ``pp_layer_offset``)."""
    layer_types: str
    """The segment's symbols, e.g. ``"*-M*-"``."""


def _reject_unsupported(pattern: str) -> None:
    if MTP_SEPARATOR in pattern:
        raise ValueError(
            f"hybrid_layer_pattern={pattern!r} has multi-token-prediction layers "
            f"('{MTP_SEPARATOR}...'), which CLA does not support (MTP depths would build attention "
            f"without a producer). Fix: drop the '{MTP_SEPARATOR}...' part (and --mtp-num-layers)."
        )
    latent = sorted({c for c in pattern if c in (DSA, MLA)})
    if latent:
        raise ValueError(
            f"hybrid_layer_pattern={pattern!r} has {latent} layers (DeepSeek sparse attention / "
            f"multi-latent attention): they compress K/V into a latent that CLA consumers cannot "
            f"share. Fix: use standard attention '{ATTENTION}' layers."
        )
    bad = sorted({c for c in pattern if c not in PASS_THROUGH | {ATTENTION, PIPE}})
    if bad:
        raise ValueError(
            f"hybrid_layer_pattern={pattern!r} has unknown symbols {bad}; use '{ATTENTION}' "
            f"attention, '{MLP}' MLP, '{MOE}' MoE, '{MAMBA}' Mamba-2, '{GDN}' Gated DeltaNet and "
            f"'{PIPE}' between pipeline segments."
        )
    if ATTENTION not in pattern:
        raise ValueError(
            f"hybrid_layer_pattern={pattern!r} has no attention layer ('{ATTENTION}'): CLA shares "
            f"the keys and values of attention layers. Fix: add '{ATTENTION}' layers, or use "
            f"Megatron's stock hybrid_stack_spec for a model without attention."
        )


@dataclass(frozen=True)
class HybridLayout:
    """A hybrid pattern and its attention numbering (build with :meth:`parse`)."""

    pattern: str
    """The main pattern as given, ``|`` separators included."""

    @classmethod
    def parse(cls, pattern: object) -> HybridLayout:
        """Validate a pattern for CLA; ``ValueError`` names the problem and the fix."""
        if not isinstance(pattern, str):
            raise ValueError(
                f"hybrid_layer_pattern must be a string such as '*-*-M*-', got {pattern!r}."
            )
        _reject_unsupported(pattern)
        return cls(pattern)

    @property
    def layer_types(self) -> str:
        """One symbol per layer, separators removed (Megatron's global layer order)."""
        return self.pattern.replace(PIPE, "")

    @property
    def num_layers(self) -> int:
        """Layers of every kind (Megatron's ``num_layers`` for this pattern)."""
        return len(self.layer_types)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Global 1-based layer numbers of the attention layers, in order."""
        return tuple(i + 1 for i, c in enumerate(self.layer_types) if c == ATTENTION)

    @property
    def num_attention_layers(self) -> int:
        """Attention layers: the layers CLA's sharing counts."""
        return len(self.attention_layers)

    def attention_number(self, layer_number: int) -> int:
        """1-based attention-layer number of the attention layer at global ``layer_number``."""
        if self.layer_types[layer_number - 1 : layer_number] != ATTENTION:
            raise ValueError(
                f"layer {layer_number} of hybrid_layer_pattern={self.pattern!r} is not an "
                f"attention layer ('{ATTENTION}')."
            )
        return self.layer_types[:layer_number].count(ATTENTION)

    def layer_number_of(self, attention_number: int) -> int:
        """Global 1-based layer number of attention layer ``attention_number``."""
        return self.attention_layers[attention_number - 1]

    @property
    def sharing_scope(self) -> str:
        """How error messages name what CLA's layer numbers count."""
        return (
            f"the {self.num_attention_layers} attention layers ('{ATTENTION}') of "
            f"hybrid_layer_pattern={self.pattern!r}"
        )

    def sharing(self, share_factor: Optional[int], producers: Optional[list]) -> KVSharing:
        """The sharing of ``cla_share_factor``/``cla_producer_layers`` over the attention layers."""
        return KVSharing.from_settings(
            self.num_attention_layers, share_factor, producers, self.sharing_scope
        )

    def describe(self, sharing: KVSharing) -> str:
        """Groups with pattern positions, e.g. ``[*1@L1 *2@L3] [*3@L5 *4@L7]``."""
        groups: list[list[str]] = []
        for k in range(1, self.num_attention_layers + 1):
            if sharing.is_producer(k):
                groups.append([])
            groups[-1].append(f"*{k}@L{self.layer_number_of(k)}")
        return " ".join("[" + " ".join(g) + "]" for g in groups)

    def segment_producers(self, sharing: KVSharing, segment: HybridSegment) -> list[int]:
        """1-based local positions of the producer attention layers of ``segment``."""
        return [
            i + 1
            for i, kind in enumerate(segment.layer_types)
            if kind == ATTENTION
            and sharing.is_producer(self.attention_number(segment.offset + i + 1))
        ]

    def segments(
        self,
        pp: int = 1,
        vp: Optional[int] = None,
        first_stage_layers: Optional[int] = None,
        last_stage_layers: Optional[int] = None,
    ) -> list[HybridSegment]:
        """The pipeline segments Megatron's ``HybridModel`` builds (its selection rules)."""
        parts = self.pattern.split(PIPE)
        if len(parts) > 1:
            return _pipe_segments(
                self.pattern, parts, pp, vp, first_stage_layers, last_stage_layers
            )
        if vp is not None and pp > 1:
            raise ValueError(
                f"virtual pipelining (virtual_pipeline_model_parallel_size={vp}) needs "
                f"hybrid_layer_pattern={self.pattern!r} to mark its {pp * vp} segments with "
                f"'{PIPE}' (Megatron's rule)."
            )
        return _even_segments(self.layer_types, pp, first_stage_layers, last_stage_layers)


def _pipe_segments(
    pattern: str, parts: list[str], pp: int, vp: Optional[int], first: Any, last: Any
) -> list[HybridSegment]:
    if first is not None or last is not None:
        raise ValueError(
            f"num_layers_in_first/last_pipeline_stage cannot be combined with '{PIPE}' in "
            f"hybrid_layer_pattern={pattern!r}: the separators already fix the stages."
        )
    if len(parts) != pp * (vp or 1):
        raise ValueError(
            f"hybrid_layer_pattern={pattern!r} has {len(parts)} pipeline segments but "
            f"pipeline_model_parallel_size={pp} x virtual chunks={vp or 1} needs {pp * (vp or 1)}."
        )
    segments, offset = [], 0
    for index, part in enumerate(parts):
        stage = index // pp if vp is not None else None
        segments.append(HybridSegment(index % pp, stage, offset, part))
        offset += len(part)
    return segments


def _even_segments(types: str, pp: int, first: Any, last: Any) -> list[HybridSegment]:
    """Megatron's split of a pattern without separators (even, or uneven first/last stage)."""
    if pp == 1:
        return [HybridSegment(0, None, 0, types)]
    sizes = [None] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    middle = [i for i, s in enumerate(sizes) if s is None]
    rest = len(types) - sum(s for s in sizes if s is not None)
    if middle and rest % len(middle):
        raise ValueError(
            f"{len(types)} pattern layers cannot be split evenly over {pp} pipeline stages "
            f"(first/last stage: {first}/{last}); mark the stages with '{PIPE}' in the pattern."
        )
    for i in middle:
        sizes[i] = rest // len(middle)
    segments, offset = [], 0
    for rank, size in enumerate(sizes):
        segments.append(HybridSegment(rank, None, offset, types[offset : offset + size]))
        offset += size
    return segments


def _cut_ok(layout: HybridLayout, sharing: KVSharing, cut: int) -> bool:
    """Whether a segment may start after ``cut`` pattern layers (its first '*' is a producer)."""
    later = [n for n in layout.attention_layers if n > cut]
    return not later or sharing.is_producer(layout.attention_number(later[0]))


def suggest_hybrid_pattern(
    layout: HybridLayout, sharing: KVSharing, num_segments: int
) -> Optional[str]:
    """``layout``'s layers cut into ``num_segments`` non-empty segments, each starting on a
    producer and as even as possible, written with ``|``; None if no such cut exists."""
    types, n = layout.layer_types, layout.num_layers
    cuts_ok = [c for c in range(1, n) if _cut_ok(layout, sharing, c)]
    if len(cuts_ok) < num_segments - 1:
        return None
    chosen: list[int] = []
    for k in range(1, num_segments):
        remaining = num_segments - 1 - k  # cuts still to place after this one
        options = [
            c
            for c in cuts_ok
            if c > (chosen[-1] if chosen else 0) and sum(d > c for d in cuts_ok) >= remaining
        ]
        target = round(k * n / num_segments)
        chosen.append(min(options, key=lambda c: (abs(c - target), c)))
    bounds = [0, *chosen, n]
    return PIPE.join(types[a:b] for a, b in pairwise(bounds))


def check_hybrid_pipeline(
    layout: HybridLayout,
    sharing: KVSharing,
    pp: int = 1,
    vp: Optional[int] = None,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> None:
    """Every pipeline segment's first attention layer must be a producer."""
    segments = layout.segments(pp, vp, first_stage_layers, last_stage_layers)
    for index, seg in enumerate(segments):
        first = seg.layer_types.find(ATTENTION)
        if first < 0:
            continue
        k = layout.attention_number(seg.offset + first + 1)
        if sharing.is_producer(k):
            continue
        suggestion = suggest_hybrid_pattern(layout, sharing, len(segments))
        fix = (
            f"hybrid_layer_pattern={suggestion!r}"
            if suggestion
            else "fewer pipeline segments than CLA groups"
        )
        where = f"pipeline rank {seg.pp_rank}" + (
            "" if seg.vp_stage is None else f", virtual chunk {seg.vp_stage}"
        )
        raise ValueError(
            f"Pipeline segment {index} ({where}) of hybrid_layer_pattern="
            f"{layout.pattern!r} starts with attention layer {k} (pattern layer "
            f"{layout.layer_number_of(k)}), a CLA consumer of attention layer "
            f"{sharing.producer_of(k)}; K/V are not sent between pipeline stages, so every "
            f"segment's first attention layer must be a producer. Groups: "
            f"{layout.describe(sharing)}. A pattern that works: {fix}."
        )
