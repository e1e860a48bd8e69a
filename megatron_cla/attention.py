"""Producer and consumer self-attention for cross-layer attention.

* :class:`CLAProducerAttention` is Megatron's stock ``SelfAttention`` (same ``linear_qkv``, same
  parameter names and layout, same forward). It additionally records the keys and values its core
  attention received, so that the layer can hand them to the consumers of its group.
* :class:`CLAConsumerAttention` owns a query projection ``linear_q`` (heads contiguous,
  ``[num_heads * head_dim, hidden]`` like Megatron's ``CrossAttention.linear_q``), the core
  attention and the output projection, and **no** key/value weights. It attends over the K/V it is
  given with :meth:`CLAConsumerAttention.attending_over`; without them it raises.

Both keep ``attention_type="self"`` (Transformer Engine and context parallelism depend on it) and
free of GPT-model assumptions, so they can be placed in any Megatron layer that provides the K/V.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from megatron.core.transformer.attention import Attention, SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import L2Norm
from megatron.core.utils import is_te_min_version

from megatron_cla._compat import pg_collection_kwarg, submodule_name
from megatron_cla.paged_attention import PagedAttentionOnCPU

__all__ = ["CLAProducerAttention", "CLAConsumerAttention", "CLAConsumerAttentionSubmodules"]


class CLAProducerAttention(PagedAttentionOnCPU, SelfAttention):
    """Stock self-attention that also exposes the K/V its core attention consumed.

    Capture is armed only inside :meth:`capturing_kv`, so recomputation in backward (selective
    ``core_attn`` recompute) does not keep stale references alive. Only references are stored:
    under selective recompute the core attention runs in ``no_grad`` and a tensor created there
    would carry no gradient.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._capture_armed = False
        self._captured_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.core_attention.register_forward_pre_hook(self._record_kv, with_kwargs=True)

    def _record_kv(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._capture_armed:
            return
        key = args[1] if len(args) > 1 else kwargs["key"]
        value = args[2] if len(args) > 2 else kwargs["value"]
        self._captured_kv = (key, value)
        self._capture_armed = False

    @contextlib.contextmanager
    def capturing_kv(self) -> Iterator[None]:
        """Record the K/V of the next core-attention call made inside this context."""
        self._captured_kv, self._capture_armed = None, True
        try:
            yield
        finally:
            self._capture_armed = False

    def take_captured_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (and forget) the recorded K/V; raise if the core attention never ran."""
        kv, self._captured_kv = self._captured_kv, None
        if kv is None:
            raise RuntimeError(
                f"CLA producer layer {self.layer_number} did not run its core attention, so it "
                f"has no K/V to hand to its consumers (static flash-decode or a custom attention "
                f"path skipped it)."
            )
        return kv


@dataclass
class CLAConsumerAttentionSubmodules:
    """Submodules of a consumer: a query projection instead of ``linear_qkv``, no K/V."""

    linear_q: Union[ModuleSpec, type]
    """Column-parallel query projection (heads contiguous). The TE spec uses a layernorm-fused
    linear (``TELayerNormColumnParallelLinear``), the local spec ``ColumnParallelLinear``."""

    core_attention: Union[ModuleSpec, type]
    """Dot-product attention module, the same class as the producer's."""

    linear_proj: Union[ModuleSpec, type] = None
    """Row-parallel output projection, the same class as the producer's."""

    q_layernorm: Union[ModuleSpec, type, None] = None
    """Optional per-head query norm (``qk_layernorm``/``qk_l2_norm``); keys were normed by the
    producer."""


def _query_only(q_emb: Any, rotary_pos_emb: Any) -> Any:
    """Rotary embeddings for the query alone (the producer already rotated the keys)."""
    return None if rotary_pos_emb is None else (q_emb, None)


def inference_mask_type(attention: Attention, ctx: Any) -> AttnMaskType:
    """The mask Megatron's own attention uses for ``ctx``: none once the prompt is cached
    (decode steps, and every dynamic-batching step, whose kernels mask causally themselves)."""
    past_prompt = not ctx.is_static_batching() or ctx.sequence_len_offset > 0
    if past_prompt and (not attention.training or not is_te_min_version("2.2.0")):
        return AttnMaskType.no_mask
    return attention.attn_mask_type


def _is_identity(spec: Any) -> bool:
    return spec is None or spec is IdentityOp or getattr(spec, "module", None) is IdentityOp


class CLAConsumerAttention(PagedAttentionOnCPU, Attention):
    """Query-only self-attention over a producer layer's keys and values."""

    def __init__(
        self,
        config: Any,
        submodules: CLAConsumerAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **kwargs,
        )
        self.linear_q = build_module(
            submodules.linear_q,
            self.config.hidden_size,
            self.query_projection_size,
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=self.config.add_bias_linear or self.config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg_collection.tp,
            **pg_collection_kwarg(submodules.linear_q, self.pg_collection),
            **submodule_name(kwargs.get("name"), "linear_q"),
        )
        self.q_layernorm = self._build_q_layernorm(submodules.q_layernorm)
        self.k_layernorm = None
        self._shared_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._reads_paged_cache = False
        self.cla_producer_layer_number: int = layer_number
        """Global layer number of the producer whose K/V this consumer reads (set by the layer)."""

    def _build_q_layernorm(self, spec: Any) -> Optional[torch.nn.Module]:
        if _is_identity(spec):
            if self.config.qk_l2_norm:
                spec = L2Norm
            elif self.config.qk_layernorm:
                raise ValueError(
                    "qk_layernorm=True but the consumer spec has no q_layernorm: build the spec "
                    "with get_gpt_layer_with_cla_*_spec(qk_layernorm=True)."
                )
            else:
                return None
        return build_module(
            spec,
            hidden_size=self.hidden_size_per_attention_head,
            config=self.config,
            eps=self.config.layernorm_epsilon,
        )

    @contextlib.contextmanager
    def attending_over(self, key: torch.Tensor, value: torch.Tensor) -> Iterator[None]:
        """Use ``key``/``value`` (the producer's) for the forward calls made inside this context."""
        self._shared_kv = (key, value)
        try:
            yield
        finally:
            self._shared_kv = None

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Optional[torch.Tensor] = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project queries from ``hidden_states``; keys and values are the producer's."""
        if not split_qkv or output_gate:
            raise ValueError(
                f"CLA consumer layer {self.layer_number} supports neither fused QKV RoPE "
                f"(split_qkv={split_qkv}) nor an attention output gate (output_gate={output_gate})."
            )
        if self._shared_kv is None and not self._reads_paged_cache:
            raise RuntimeError(
                f"CLA consumer layer {self.layer_number} was called without its producer's K/V. "
                f"Call it inside `attending_over(key, value)` (CLATransformerLayer does this)."
            )
        key, value = self._shared_kv or (None, None)
        query, _ = self.linear_q(hidden_states)
        # [sq, b, np_local * hn] -> [sq, b, np_local, hn]
        query = query.view(*query.shape[:-1], -1, self.hidden_size_per_attention_head)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        return query, key, value

    @contextlib.contextmanager
    def reading_paged_cache(self) -> Iterator[None]:
        """Dynamic batching: read K/V from the producer's slot of the paged cache, not from
        ``context`` (the producer's core attention does not run on the paged path)."""
        self._reads_paged_cache = True
        try:
            yield
        finally:
            self._reads_paged_cache = False

    def _adjust_key_value_for_inference(
        self,
        inference_context: Any,
        query: torch.Tensor,
        key: Optional[torch.Tensor],
        value: Optional[torch.Tensor],
        rotary_pos_emb: Any,
        rotary_pos_cos: Any = None,
        rotary_pos_sin: Any = None,
        rotary_pos_cos_sin: Any = None,
        *args: Any,
        inference_params: Any = None,
        **kwargs: Any,
    ) -> tuple:
        """Use the producer's K/V: never allocate or append a cache of our own.

        Keys were rotated by the producer, so only the query keeps its rotary embedding.
        Training and static batching: ``key``/``value`` are the producer's post-RoPE K/V (full
        cached length). Dynamic batching: the producer's slot of the paged buffer.
        """
        ctx = inference_context if inference_context is not None else inference_params
        q_emb = None if rotary_pos_emb is None else rotary_pos_emb[0]
        if ctx is None:
            return query, key, value, _query_only(q_emb, rotary_pos_emb), self.attn_mask_type, None
        mask_type = inference_mask_type(self, ctx)
        if ctx.is_static_batching():
            if q_emb is not None:  # positions of this step's queries
                start = ctx.sequence_len_offset
                q_emb = q_emb[start : start + query.size(0)]
            return query, key, value, _query_only(q_emb, rotary_pos_emb), mask_type, None
        if not self._reads_paged_cache:
            raise RuntimeError(
                f"CLA consumer layer {self.layer_number} got a dynamic inference context outside "
                f"`reading_paged_cache()` (CLATransformerLayer enters it)."
            )
        if getattr(ctx, "use_flashinfer_fused_rope", False) and rotary_pos_cos_sin is not None:
            raise ValueError(
                "flashinfer fused RoPE rotates queries and keys together; CLA consumers have no "
                "keys to rotate. Build the context with use_flashinfer_fused_rope=False."
            )
        local = self.cla_producer_layer_number - self._get_pp_layer_offset_for_inference()
        key, value, block_table = ctx.key_value_cache(local)
        return query, key, value, _query_only(q_emb, rotary_pos_emb), mask_type, block_table

    def backward_dw(self) -> None:
        """Delayed weight-gradient computation (``delay_wgrad_compute``)."""
        self.linear_q.backward_dw()
        self.linear_proj.backward_dw()

    def set_for_recompute_input_layernorm(self) -> None:
        """FP8 + selective ``layernorm`` recompute: keep linear_q's original input."""
        from megatron.core.extensions.transformer_engine import set_save_original_input

        set_save_original_input(self.linear_q)

    def clip_qk(self) -> None:
        """QK-clip needs K weights, which consumers do not own (rejected at build time)."""
        raise NotImplementedError(f"CLA consumer layer {self.layer_number} has no K weights.")
