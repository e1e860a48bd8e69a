"""``CLATransformerConfig``: Megatron's ``TransformerConfig`` plus the cross-layer sharing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cla.hybrid_layout import HybridLayout
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
    ceil(num_layers / S) layers. In a hybrid model the layers counted are the attention layers."""

    cla_producer_layers: Optional[list[int]] = None
    """Explicit 1-based global producer layers (attention layers in a hybrid model) for
    non-uniform sharing, e.g. the paper's KeepEnds on 6 layers ``[1, 2, 4, 6]``. Must start with
    1 and increase strictly; each other layer reads the nearest producer before it. Leave
    ``cla_share_factor`` at 1 when this is set."""

    hybrid_layer_pattern: Optional[str] = None
    """For ``HybridModel``: the model's pattern (``*`` attention, ``-`` MLP, ``E`` MoE, ``M``
    Mamba-2, ``G`` GDN, ``|`` pipeline segments), the one given to ``HybridModel``. The sharing
    then counts attention layers (``*`` slots, in order) instead of ``num_layers``, pipeline
    checks follow the pattern's segments, and ``num_layers`` must equal the pattern's length.
    None for ``GPTModel``."""

    def __post_init__(self) -> None:
        layout = self.cla_hybrid_layout
        if layout is not None:
            # before Megatron's own checks: it scales the output-layer init by the layer count
            # differently for hybrid stacks (as Megatron-LM sets it for --hybrid-layer-pattern)
            self.is_hybrid_model = True
        super().__post_init__()
        if layout is not None:
            if self.num_layers != layout.num_layers:
                raise ValueError(
                    f"num_layers={self.num_layers} but hybrid_layer_pattern="
                    f"{self.hybrid_layer_pattern!r} has {layout.num_layers} layers: set "
                    f"num_layers={layout.num_layers} (one per pattern symbol)."
                )
        validate_cla_setup(self, self.cla_sharing, layout)
        if self.cla_sharing.has_consumers:
            # Producers and consumers have differently shaped attention weights, which Megatron's
            # stacked (homogeneous) dist-checkpoint layout cannot hold: use per-layer keys.
            self.hetereogenous_dist_checkpoint = True

    @property
    def cla_hybrid_layout(self) -> Optional[HybridLayout]:
        """The parsed ``hybrid_layer_pattern`` (None for a GPT decoder)."""
        if self.hybrid_layer_pattern is None:
            return None
        return HybridLayout.parse(self.hybrid_layer_pattern)

    @property
    def cla_sharing(self) -> KVSharing:
        """The producer/consumer assignment these settings describe (over attention layers)."""
        layout = self.cla_hybrid_layout
        if layout is not None:
            return layout.sharing(self.cla_share_factor, self.cla_producer_layers)
        return KVSharing.from_settings(
            self.num_layers, self.cla_share_factor, self.cla_producer_layers
        )
