"""Everything that differs between the supported megatron-core releases (0.16.1 ... 0.19.x).

Keep version probes here and nowhere else. Probes test for the feature (a keyword, an attribute),
not for a version number, so that patch releases in between keep working.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from typing import Any, Optional

from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank
from packaging.version import Version

MIN_MEGATRON_CORE = Version("0.16.1")
"""Oldest megatron-core release the package is tested with."""

MEGATRON_CORE_VERSION = Version(importlib.metadata.version("megatron-core"))
"""The installed megatron-core release."""

_LAYER_INIT_PARAMS = frozenset(inspect.signature(TransformerLayer.__init__).parameters)


def transformer_engine_available() -> bool:
    """Whether the ``transformer_engine`` package can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine(what: str) -> None:
    """Raise a clear ImportError when Transformer Engine is missing."""
    if not transformer_engine_available():
        raise ImportError(
            f"{what} needs NVIDIA Transformer Engine, but the package 'transformer_engine' is "
            f"not installed. Install it with `pip install megatron-cla[te]` (or "
            f"`pip install --no-build-isolation transformer_engine[pytorch]` on a machine with "
            f"CUDA), or use the local backend (use_transformer_engine=False)."
        )


def hybrid_model_available() -> bool:
    """Whether this megatron-core has ``HybridModel`` (0.19+; absent from 0.16)."""
    return importlib.util.find_spec("megatron.core.models.hybrid") is not None


def require_hybrid_model(what: str) -> None:
    """Raise a clear ImportError when this megatron-core has no ``HybridModel``."""
    if not hybrid_model_available():
        raise ImportError(
            f"{what} needs Megatron-Core's HybridModel (megatron.core.models.hybrid), which "
            f"megatron-core {MEGATRON_CORE_VERSION} does not have. Install megatron-core>=0.19 "
            f"(Python 3.12), or use GPTModel with megatron_cla.get_cla_decoder_block_spec."
        )


FP8_RECIPES: dict[str, str] = {
    "delayed": "check_fp8_support",
    "tensorwise": "check_fp8_support",
    "blockwise": "check_fp8_block_scaling_support",
    "mxfp8": "check_mxfp8_support",
}
"""Megatron's FP8 recipes (``TransformerConfig.fp8_recipe``) -> TE's support check."""


def fp8_recipe_support(recipe: str) -> tuple[bool, str]:
    """Whether this GPU and Transformer Engine can run ``recipe`` (TE's own check and reason).

    TE 2.8 moved the checks from ``transformer_engine.pytorch.fp8`` to ``.quantization``.
    """
    try:
        from transformer_engine.pytorch import quantization as checks
    except ImportError:
        from transformer_engine.pytorch import fp8 as checks
    ok, reason = getattr(checks, FP8_RECIPES[recipe])()
    return bool(ok), str(reason)


def global_layer_number(
    config: Any,
    layer_number: int,
    vp_stage: Optional[int],
    pg_collection: Any,
    layer_kwargs: dict,
) -> int:
    """The global 1-based layer number TransformerLayer.__init__ will compute from its arguments.

    0.19 added ``is_mtp_layer`` and ``add_layer_offset``: with either, the caller's number is
    already final.
    """
    if layer_kwargs.get("is_mtp_layer", False) or not layer_kwargs.get("add_layer_offset", True):
        return layer_number
    if pg_collection is not None and hasattr(pg_collection, "pp"):
        pp_rank = get_pg_rank(pg_collection.pp)
    else:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)


def unknown_layer_kwargs(layer_kwargs: dict) -> list[str]:
    """Keyword arguments this megatron-core's TransformerLayer does not accept."""
    return sorted(k for k in layer_kwargs if k not in _LAYER_INIT_PARAMS)


def submodule_name(parent_name: Optional[str], child: str) -> dict:
    """0.19 passes ``name=`` down to submodules; 0.16 builders do not accept it."""
    if parent_name is None:
        return {}
    return {"name": f"{parent_name}.{child}"}


def pg_collection_kwarg(spec: Any, pg_collection: Any) -> dict:
    """``pg_collection=`` for a linear layer class that takes it (Megatron-LM main builds
    ``linear_qkv`` with it, e.g. for GTP weight rematerialization); 0.16-0.19 linears do not."""
    module = getattr(spec, "module", spec)
    try:
        params = inspect.signature(module.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {"pg_collection": pg_collection} if "pg_collection" in params else {}


def cuda_graph_scope_field(config: Any) -> str:
    """The config field that lists CUDA-graph capture regions (renamed in 0.19)."""
    return "cuda_graph_modules" if hasattr(config, "cuda_graph_modules") else "cuda_graph_scope"


def cuda_graph_captures_attention(config: Any) -> bool:
    """Whether CUDA graphs are enabled with a scope that includes self-attention."""
    impl = getattr(config, "cuda_graph_impl", "none")
    if getattr(config, "enable_cuda_graph", False):
        impl = "local"
    if impl in (None, "none"):
        return False
    if impl in ("local", "full_iteration"):
        return True
    regions = getattr(config, cuda_graph_scope_field(config), None) or []
    scopes = {getattr(s, "name", str(s)) for s in regions}
    return not scopes or bool(scopes & {"attn", "full", "full_iteration"})
