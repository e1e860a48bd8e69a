"""Which decoder layers produce K/V and which consume it: pure functions, no Megatron imports.

Layer numbers count *attention* layers, globally and 1-based. In a GPT decoder every layer is an
attention layer, so they are Megatron's layer numbers; in a hybrid stack (``HybridModel``) they
count the ``*`` slots of the pattern in order (see :mod:`megatron_cla.hybrid_layout`). A *producer*
computes its own keys and values;
a *consumer* attends over the keys and values of the nearest producer before it. Layer 1 is always
a producer. A *group* is a producer followed by its consumers.

Uniform sharing with factor S makes layers 1, S+1, 2S+1, ... producers (the last group is shorter
when S does not divide the number of layers). An explicit producer list expresses the paper's
non-uniform patterns (KeepEnds, DenseFront, DenseBack).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Optional, Sequence

__all__ = ["KVSharing"]


def _check_share_factor(num_layers: int, share_factor: object, scope: Optional[str]) -> int:
    if isinstance(share_factor, bool) or not isinstance(share_factor, int):
        raise ValueError(
            f"cla_share_factor must be an int, got {share_factor!r} "
            f"({type(share_factor).__name__}). Use e.g. cla_share_factor=2 for CLA2."
        )
    if share_factor < 1:
        raise ValueError(
            f"cla_share_factor must be >= 1, got {share_factor}. Use 1 for plain attention "
            f"(every layer computes its own K/V) or S >= 2 to share K/V across S layers."
        )
    if share_factor > num_layers:
        raise ValueError(
            f"cla_share_factor={share_factor} exceeds {scope or f'num_layers={num_layers}'}. "
            f"Use a factor between 1 and {num_layers}."
        )
    return share_factor


def _check_producer_layers(
    num_layers: int, producers: object, scope: Optional[str]
) -> tuple[int, ...]:
    if not isinstance(producers, (list, tuple)):
        raise ValueError(
            f"cla_producer_layers must be a list of 1-based layer numbers, got {producers!r}. "
            f"Example for 6 layers: [1, 2, 4, 6]."
        )
    bad = [p for p in producers if isinstance(p, bool) or not isinstance(p, int)]
    if bad:
        raise ValueError(f"cla_producer_layers must contain ints, got {bad!r} in {producers!r}.")
    if not producers or producers[0] != 1:
        raise ValueError(
            f"cla_producer_layers={list(producers)} must start with layer 1: the first layer "
            f"has no earlier layer to read K/V from. Add 1 to the list."
        )
    if any(b <= a for a, b in pairwise(producers)):
        raise ValueError(
            f"cla_producer_layers={list(producers)} must be strictly increasing "
            f"(no duplicates). Sort it and remove repeated layers."
        )
    if producers[-1] > num_layers:
        raise ValueError(
            f"cla_producer_layers={list(producers)} names layer {producers[-1]}, but "
            f"{scope or f'the model has num_layers={num_layers}'} (numbered 1..{num_layers})."
        )
    return tuple(producers)


@dataclass(frozen=True)
class KVSharing:
    """The producer/consumer assignment of a decoder stack.

    Build it with :meth:`uniform` or :meth:`from_producer_layers`; both validate their input and
    raise ``ValueError`` with the fix.
    """

    num_layers: int
    """Number of decoder layers (Megatron's ``config.num_layers``)."""

    producer_layers: tuple[int, ...]
    """Global 1-based numbers of the layers that compute K/V, increasing, starting with 1."""

    @classmethod
    def uniform(cls, num_layers: int, share_factor: int, scope: Optional[str] = None) -> KVSharing:
        """Producers at 1, S+1, 2S+1, ... for share factor S.

        ``scope`` names what is counted in error messages (default ``num_layers=N``; a hybrid
        model counts its attention layers)."""
        s = _check_share_factor(num_layers, share_factor, scope)
        return cls(num_layers, tuple(range(1, num_layers + 1, s)))

    @classmethod
    def from_producer_layers(
        cls, num_layers: int, producers: Sequence[int], scope: Optional[str] = None
    ) -> KVSharing:
        """Explicit producers, e.g. KeepEnds on 6 layers: ``[1, 2, 4, 6]``."""
        return cls(num_layers, _check_producer_layers(num_layers, producers, scope))

    @classmethod
    def from_settings(
        cls,
        num_layers: int,
        share_factor: Optional[int],
        producer_layers: Optional[Sequence[int]],
        scope: Optional[str] = None,
    ) -> KVSharing:
        """Resolve ``cla_share_factor`` / ``cla_producer_layers`` (at most one may be set)."""
        if producer_layers is not None:
            if share_factor not in (None, 1):
                raise ValueError(
                    f"Set either cla_share_factor={share_factor} or "
                    f"cla_producer_layers={list(producer_layers)}, not both: the producer list "
                    f"already fixes the sharing. Leave cla_share_factor at 1."
                )
            return cls.from_producer_layers(num_layers, producer_layers, scope)
        return cls.uniform(num_layers, 1 if share_factor is None else share_factor, scope)

    def is_producer(self, layer_number: int) -> bool:
        """True for producers and for layers past the decoder (e.g. MTP layers)."""
        return layer_number > self.num_layers or layer_number in self._producer_set

    def producer_of(self, layer_number: int) -> int:
        """The producer whose K/V ``layer_number`` attends over (itself for a producer)."""
        if layer_number < 1:
            raise ValueError(f"layer numbers are 1-based, got {layer_number}")
        if self.is_producer(layer_number):
            return layer_number
        return max(p for p in self.producer_layers if p < layer_number)

    def is_last_of_group(self, layer_number: int) -> bool:
        """True if no later layer reads this layer's group K/V (the hand-off can end here)."""
        return layer_number >= self.num_layers or self.is_producer(layer_number + 1)

    @property
    def has_consumers(self) -> bool:
        """Whether any layer shares K/V (False means plain attention everywhere)."""
        return len(self.producer_layers) < self.num_layers

    @property
    def consumer_layers(self) -> tuple[int, ...]:
        """Global 1-based numbers of the layers that read a producer's K/V."""
        return tuple(n for n in range(1, self.num_layers + 1) if n not in self._producer_set)

    @property
    def num_kv_layers(self) -> int:
        """Number of layers that hold a KV cache at inference time."""
        return len(self.producer_layers)

    def describe(self) -> str:
        """Human-readable groups, e.g. ``"[1 2] [3 4] [5]"``."""
        groups: list[list[int]] = []
        for n in range(1, self.num_layers + 1):
            if self.is_producer(n):
                groups.append([])
            groups[-1].append(n)
        return " ".join("[" + " ".join(map(str, g)) + "]" for g in groups)

    @property
    def _producer_set(self) -> frozenset[int]:
        return frozenset(self.producer_layers)
