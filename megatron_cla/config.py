"""``CLATransformerConfig``: Megatron's ``TransformerConfig`` plus the cross-layer sharing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cla.sharing import KVSharing
from megatron_cla.validation import validate_cla_setup

__all__ = ["CLATransformerConfig"]


@dataclass
class CLATransformerConfig(TransformerConfig):
    """Transformer config for models with cross-layer attention (CLA).

    All validation runs in ``__post_init__``: an invalid sharing, a pipeline split that starts a
    stage on a consumer, or a feature CLA cannot be combined with raises ``ValueError`` before
    anything is allocated.
    """

    cla_share_factor: int = 1
    """S: one K/V-producing layer per S adjacent layers (layers 1, S+1, 2S+1, ... produce; the
    others reuse the nearest producer's K/V). 1 means plain attention (every layer produces). The
    last group is shorter when S does not divide ``num_layers``. KV cache shrinks to
    ceil(num_layers / S) layers."""

    cla_producer_layers: Optional[list[int]] = None
    """Explicit 1-based global producer layers for non-uniform sharing, e.g. the paper's KeepEnds
    on 6 layers ``[1, 2, 4, 6]``. Must start with 1 and increase strictly; each other layer reads
    the nearest producer before it. Leave ``cla_share_factor`` at 1 when this is set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_cla_setup(self, self.cla_sharing)
        if self.cla_sharing.has_consumers:
            # Producers and consumers have differently shaped attention weights, which Megatron's
            # stacked (homogeneous) dist-checkpoint layout cannot hold: use per-layer keys.
            self.hetereogenous_dist_checkpoint = True

    @property
    def cla_sharing(self) -> KVSharing:
        """The producer/consumer assignment these settings describe."""
        return KVSharing.from_settings(
            self.num_layers, self.cla_share_factor, self.cla_producer_layers
        )
