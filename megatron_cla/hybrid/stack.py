"""``CLAHybridStack``: Megatron's ``HybridStack`` with the K/V hand-off threaded through every slot.

Megatron's stack cannot carry CLA's K/V (``megatron_cla/kv_handoff.py``): its normal forward calls
each layer without ``context`` and drops what layers return besides hidden states, and its full
recompute resets ``context`` after every Mamba slot. There is no hook for the layer loop, so this
subclass owns the loop (:meth:`CLAHybridStack._run_layers`) and uses it everywhere: training, eval,
static and dynamic inference, and every checkpoint chunk of full recomputation (uniform and block,
chunks that split a group or start on an MLP/MoE/Mamba slot). Transformer-layer slots (attention,
MLP, MoE, GDN) take the hand-off as ``context`` and return it (non-CLA slots pass it through
untouched); other slots (Mamba) are stepped over with the hand-off held. Everything else (building
the layers, pipeline segments, checkpoint keys, Mamba state shapes) is Megatron's own.

Construction also decides and validates the sharing before any layer is built:

* the pattern comes from the spec (``hybrid_layer_pattern``), the config (``hybrid_layer_pattern``
  / ``hybrid_override_pattern``, e.g. a Megatron-Bridge provider), Megatron-LM's parsed arguments
  (``pretrain_hybrid.py``), or, for a single-stage model, the layers being built; it must agree
  with the segment ``HybridModel`` asks for;
* every attention layer gets the pattern and the resolved producer list, so producer and consumer
  roles count attention layers (:mod:`megatron_cla.hybrid_layout`);
* pattern slots whose layer spec is missing (``IdentityOp``) or unavailable here are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp4_utils import get_fp4_context
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.inference.utils import InferenceMode
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import (
    WrappedTensor,
    deprecate_inference_params,
    get_pg_size,
    make_viewless_tensor,
)

from megatron_cla.hybrid_layout import HybridLayout
from megatron_cla.layer import CLATransformerLayer, resolve_sharing
from megatron_cla.validation import validate_cla_setup

__all__ = ["CLAHybridStack", "CLAHybridStackSubmodules", "UnavailableLayer"]

SLOT_FIELDS = {"*": "attention_layer", "-": "mlp_layer", "E": "moe_layer"}
SLOT_FIELDS.update({"M": "mamba_layer", "G": "gdn_layer"})
"""Pattern symbol -> ``HybridStackSubmodules`` field that builds it."""


@dataclass
class CLAHybridStackSubmodules(HybridStackSubmodules):
    """Megatron's hybrid submodules plus the final norm (Megatron's stack hard-codes TE's)."""

    final_norm: Union[ModuleSpec, type, None] = None
    """Norm after the last layer of the last stage; None = Transformer Engine's ``TENorm``."""


class UnavailableLayer(torch.nn.Module):
    """Spec placeholder for a slot this installation cannot build (e.g. Mamba-2 without TE).

    :class:`CLAHybridStack` refuses a pattern that uses it, with ``reason``, before building.
    """

    def __init__(self, *args: Any, reason: str = "", **kwargs: Any) -> None:
        raise ImportError(reason)


def _pattern_from_megatron_args() -> Optional[str]:
    """``--hybrid-layer-pattern`` of a running Megatron-LM ``pretrain_hybrid.py``, if any.

    Only looked up when ``megatron.training`` is already loaded: importing it (its package
    imports the training loop) would reconfigure logging for the whole process."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return None
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    return getattr(args, "hybrid_layer_pattern", None) if args is not None else None


def _resolve_layout(
    pattern: Optional[str],
    config: Any,
    layer_type_list: list,
    pp_layer_offset: int,
    pp_size: int,
) -> HybridLayout:
    """The whole model's pattern, checked against the segment this stack builds."""
    segment = "".join(layer_type_list)
    for candidate in (
        pattern,
        getattr(config, "hybrid_layer_pattern", None),
        getattr(config, "hybrid_override_pattern", None),
        _pattern_from_megatron_args(),
    ):
        if candidate:
            pattern = candidate
            break
    else:
        if pp_size > 1 or config.virtual_pipeline_model_parallel_size is not None:
            raise ValueError(
                f"CLAHybridStack builds segment {segment!r} of a pipelined model but does not know "
                f"the whole hybrid_layer_pattern, which CLA needs to count attention layers across "
                f"stages. Fix: get_cla_hybrid_stack_spec(..., hybrid_layer_pattern=...), or a "
                f"config with a hybrid_layer_pattern field (megatron_cla.CLATransformerConfig)."
            )
        pattern = segment
    layout = HybridLayout.parse(pattern)
    built = layout.layer_types[pp_layer_offset : pp_layer_offset + len(segment)]
    if built != segment:
        raise ValueError(
            f"HybridModel builds layers {segment!r} at offset {pp_layer_offset}, but the CLA "
            f"stack's hybrid_layer_pattern={layout.pattern!r} has {built!r} there: give "
            f"HybridModel and the CLA spec the same pattern."
        )
    return layout


def _check_slots(submodules: Any, layer_type_list: list) -> None:
    """Every symbol of the segment must have a real layer spec (IdentityOp would be silent)."""
    for symbol in sorted(set(layer_type_list)):
        field = SLOT_FIELDS[symbol]
        spec = getattr(submodules, field, IdentityOp)
        module = getattr(spec, "module", spec)
        if module is IdentityOp:
            raise ValueError(
                f"the pattern has '{symbol}' layers but the hybrid stack spec's {field} is "
                f"IdentityOp (the layers would silently do nothing). Fix: give the spec a "
                f"{field}, or remove '{symbol}' from hybrid_layer_pattern."
            )
        if module is UnavailableLayer:
            raise ImportError(spec.params["reason"])
    attention = getattr(submodules.attention_layer, "module", None)
    if not (isinstance(attention, type) and issubclass(attention, CLATransformerLayer)):
        raise ValueError(
            f"CLAHybridStack needs a CLATransformerLayer attention_layer spec, got "
            f"{attention!r}: build the spec with megatron_cla.hybrid.get_cla_hybrid_stack_spec."
        )


def _with_cla_attention(submodules: Any, layout: HybridLayout, producers: list) -> Any:
    """A copy of ``submodules`` whose attention layers know the pattern and the producers."""
    spec = submodules.attention_layer
    params = {
        k: v
        for k, v in spec.params.items()
        if k not in ("cla_share_factor", "cla_producer_layers", "cla_settings_from_env")
    }
    params.update(cla_hybrid_layout=layout, cla_producer_layers=list(producers))
    submodules = copy.copy(submodules)
    submodules.attention_layer = dataclasses.replace(spec, params=params)
    return submodules


def _quantization_contexts(config: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(outer context around all layers, per-layer context), placed as Megatron places them."""
    delayed = bool(config.fp8) and config.fp8_recipe == Fp8Recipe.delayed
    outer = get_fp8_context(config) if delayed else nullcontext()

    def per_layer(layer: Any) -> Any:
        if config.fp8 and not delayed:
            return get_fp8_context(config, layer.layer_number - 1)
        if config.fp4:
            return get_fp4_context(config, layer.layer_number - 1)
        return nullcontext()

    return outer, per_layer


class CLAHybridStack(HybridStack):
    """A hybrid stack whose producers hand K/V to their consumers (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        submodules: Optional[HybridStackSubmodules] = None,
        pre_process: bool = True,
        layer_type_list: Optional[list] = None,
        pp_layer_offset: int = 0,
        post_layer_norm: bool = True,
        post_process: bool = True,
        device: Any = None,
        dtype: Any = None,
        pg_collection: Any = None,
        is_mtp_layer: bool = False,
        *,
        hybrid_layer_pattern: Optional[str] = None,
        cla_share_factor: Optional[int] = None,
        cla_producer_layers: Optional[list] = None,
        cla_settings_from_env: bool = False,
        cla_submodules_factory: Optional[Callable[[Any], HybridStackSubmodules]] = None,
        **kwargs: Any,
    ) -> None:
        if is_mtp_layer:
            raise ValueError(
                "CLA hybrid stacks cannot build multi-token-prediction layers; drop the MTP part "
                "of hybrid_layer_pattern."
            )
        if submodules is None:
            if cla_submodules_factory is None:
                raise ValueError("CLAHybridStack needs submodules or cla_submodules_factory.")
            submodules = cla_submodules_factory(config)
        if layer_type_list is None or pg_collection is None:
            raise ValueError(
                "CLAHybridStack is built by HybridModel (it needs layer_type_list and "
                "pg_collection)."
            )
        pp_size = get_pg_size(pg_collection.pp)
        layout = _resolve_layout(
            hybrid_layer_pattern, config, layer_type_list, pp_layer_offset, pp_size
        )
        sharing = resolve_sharing(
            config, cla_share_factor, cla_producer_layers, cla_settings_from_env, layout
        )
        validate_cla_setup(config, sharing, layout)
        _check_slots(submodules, layer_type_list)
        final_norm = getattr(submodules, "final_norm", None)
        super().__init__(
            config,
            _with_cla_attention(submodules, layout, list(sharing.producer_layers)),
            pre_process=pre_process,
            layer_type_list=layer_type_list,
            pp_layer_offset=pp_layer_offset,
            post_layer_norm=post_layer_norm and final_norm is None,
            post_process=post_process,
            device=device,
            dtype=dtype,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            **kwargs,
        )
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm and final_norm is not None:
            self.final_norm = build_module(
                final_norm,
                config=config,
                hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )
        self.cla_layout = layout
        """The whole model's pattern (all pipeline segments)."""
        self.cla_sharing = sharing
        """Producer/consumer assignment over the pattern's attention layers."""

    def _run_layers(
        self, start: int, end: int, hidden_states: torch.Tensor, context: Any, step: dict
    ) -> tuple[torch.Tensor, Any]:
        """Layers ``start:end`` with the K/V hand-off ``context`` threaded through all of them.

        ``step`` holds the per-call arguments of the transformer layers; its ``quantization``
        entry is the per-layer FP8/FP4 context factory.
        """
        step = dict(step)
        quantization = step.pop("quantization")
        for layer in self.layers[start:end]:
            with quantization(layer):
                if isinstance(layer, TransformerLayer):
                    hidden_states, context = layer(
                        hidden_states=hidden_states, context=context, **step
                    )
                else:  # Mamba (or another non-transformer mixer): the hand-off waits
                    hidden_states = layer(
                        hidden_states=hidden_states,
                        attention_mask=step["attention_mask"],
                        inference_context=step["inference_context"],
                        packed_seq_params=step["packed_seq_params"],
                    )
            if isinstance(hidden_states, tuple):
                hidden_states = hidden_states[0]
        return hidden_states, context

    def _checkpoint(self, function: Callable, *args: Any) -> Any:
        """Megatron's precision-aware activation checkpoint (TE's under FP8/FP4)."""
        config = self.config
        if config.fp8 or config.fp4:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(
                function,
                config.distribute_saved_activations,
                tensor_parallel.random.get_cuda_rng_tracker,
                self.pg_collection.tp,
                *args,
            )
        return tensor_parallel.checkpoint(function, config.distribute_saved_activations, *args)

    def _recompute_spans(self, hidden_states: torch.Tensor) -> list[tuple[int, int, bool]]:
        """(start, end, checkpointed) chunks of Megatron's ``uniform`` / ``block`` methods."""
        config, n = self.config, len(self.layers)
        size = config.recompute_num_layers
        if config.recompute_method == "uniform":
            return [(s, min(s + size, n), True) for s in range(0, n, size)]
        if config.recompute_method == "block":
            # Under FP8/FP4 the re-entrant checkpoint needs an input that requires grad: Megatron
            # pushes the window past leading layers whose input does not (first pipeline stage).
            skip = 1 if (config.fp8 or config.fp4) and not hidden_states.requires_grad else 0
            return [(i, i + 1, skip <= i < size + skip) for i in range(n)]
        raise ValueError(
            f"recompute_method={config.recompute_method!r}: use 'uniform' or 'block' with full "
            f"activation recomputation."
        )

    def _checkpointed_forward(self, hidden_states: torch.Tensor, step: dict) -> torch.Tensor:
        """Full recomputation: the hand-off is an explicit input and output of every chunk."""
        context = None
        for start, end, checkpointed in self._recompute_spans(hidden_states):

            def chunk(hidden: torch.Tensor, handoff: Any, start: int = start, end: int = end):
                return self._run_layers(start, end, hidden, handoff, step)

            if checkpointed:
                hidden_states, context = self._checkpoint(chunk, hidden_states, context)
            else:
                hidden_states, context = chunk(hidden_states, context)
        return hidden_states

    def _sequence_len_offset(self, hidden_states: torch.Tensor, ctx: Any) -> Any:
        """Per-request offsets for CUDA-graphed / flash-decode static inference (as Megatron)."""
        if (
            (self.config.cuda_graph_impl == "local" or self.config.flash_decode)
            and ctx
            and ctx.is_static_batching()
            and InferenceMode.is_active()
        ):
            batch = hidden_states.shape[1]
            return torch.tensor([ctx.sequence_len_offset] * batch, dtype=torch.int32, device="cuda")
        return None

    def forward(
        self,
        hidden_states: Union[torch.Tensor, WrappedTensor],
        attention_mask: Optional[torch.Tensor],
        inference_context: Any = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        *,
        inference_params: Any = None,
        packed_seq_params: Any = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``HybridStack.forward`` with the K/V hand-off (same arguments and result)."""
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if not self.pre_process:
            hidden_states = self.input_tensor  # set by the pipeline schedule
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if inference_context and inference_context.is_static_batching():
            # the attributes Mamba's static-inference code reads (as Megatron's stack sets them)
            inference_context.max_seqlen = inference_context.max_sequence_length
            inference_context.seqlen_offset = inference_context.sequence_len_offset
        outer, per_layer = _quantization_contexts(self.config)
        step = dict(
            quantization=per_layer,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            inference_context=inference_context,
            sequence_len_offset=self._sequence_len_offset(hidden_states, inference_context),
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        with outer:
            if self.config.recompute_granularity == "full" and self.training:
                hidden_states = self._checkpointed_forward(hidden_states, step)
            else:
                hidden_states, _ = self._run_layers(0, len(self.layers), hidden_states, None, step)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        return make_viewless_tensor(
            inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )
