"""Megatron-Core inference engines for CLA models, on every supported megatron-core version.

* :func:`build_dynamic_engine`: ``DynamicInferenceEngine`` over a
  :class:`~megatron_cla.inference.CLADynamicInferenceContext` (paged, producer slots only).
* :class:`CLAStaticInferenceEngine`: Megatron's ``StaticInferenceEngine``, whose default
  (non-legacy) mode builds a paged context itself; here that context is the CLA one. Megatron's
  engine falls back to its legacy path with only a warning when the paged context cannot be
  built; this one raises instead.
* :func:`inference_wrapper`: ``GPTInferenceWrapper`` with the arguments the installed version
  wants.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Iterator, Optional

from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.engines import static_engine
from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
from megatron.core.inference.engines.static_engine import StaticInferenceEngine
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)

from megatron_cla.inference.context import CONTEXT_TAKES_MODEL_CONFIG, CLADynamicInferenceContext

__all__ = [
    "CLAStaticInferenceEngine",
    "build_dynamic_engine",
    "build_static_engine",
    "inference_wrapper",
]

WRAPPER_TAKES_WRAPPER_CONFIG = (
    "inference_wrapper_config" in inspect.signature(GPTInferenceWrapper).parameters
)
"""megatron-core <= 0.16: ``GPTInferenceWrapper(model, InferenceWrapperConfig, context)``."""


def inference_wrapper(
    model: Any, context: Any, *, max_requests: int, max_sequence_length: int, vocab_size: int
) -> GPTInferenceWrapper:
    """``GPTInferenceWrapper`` of ``model`` with ``context``, on any supported megatron-core."""
    if not WRAPPER_TAKES_WRAPPER_CONFIG:
        return GPTInferenceWrapper(model, context)
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )

    config = model.config
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # never split a step into micro-batches
        fp32_residual_connection=config.fp32_residual_connection,
        padded_vocab_size=vocab_size,
        inference_max_requests=max_requests,
        inference_max_seq_length=max_sequence_length,
    )
    return GPTInferenceWrapper(model, wrapper_config, context)


def build_dynamic_engine(
    model: Any,
    tokenizer: Any,
    *,
    vocab_size: int,
    max_sequence_length: int,
    buffer_size_gb: float,
    block_size_tokens: int = 256,
    max_requests: Optional[int] = None,
    max_tokens: Optional[int] = None,
    random_seed: int = 1234,
) -> DynamicInferenceEngine:
    """A ``DynamicInferenceEngine`` whose paged cache holds only ``model``'s producer layers."""
    context = CLADynamicInferenceContext.for_model(
        model,
        max_sequence_length=max_sequence_length,
        buffer_size_gb=buffer_size_gb,
        block_size_tokens=block_size_tokens,
        max_requests=max_requests,
        max_tokens=max_tokens,
    )
    wrapper = inference_wrapper(
        model,
        context,
        max_requests=context.max_requests,
        max_sequence_length=max_sequence_length,
        vocab_size=vocab_size,
    )
    controller = TextGenerationController(wrapper, tokenizer)
    if CONTEXT_TAKES_MODEL_CONFIG:
        return DynamicInferenceEngine(controller, context)
    return DynamicInferenceEngine(controller, context, random_seed=random_seed)


@contextlib.contextmanager
def _engine_builds_cla_contexts(model: Any) -> Iterator[None]:
    """Make ``StaticInferenceEngine.__init__`` build a CLA paged context for ``model``."""
    original = static_engine.DynamicInferenceContext
    static_engine.DynamicInferenceContext = CLADynamicInferenceContext.bind(model)
    try:
        yield
    finally:
        static_engine.DynamicInferenceContext = original


class CLAStaticInferenceEngine(StaticInferenceEngine):
    """Megatron's ``StaticInferenceEngine`` with a paged cache sized for CLA producers."""

    def __init__(self, text_generation_controller: Any, *args: Any, **kwargs: Any) -> None:
        model = text_generation_controller.inference_wrapped_model.model
        legacy = bool(kwargs.get("legacy", args[2] if len(args) > 2 else False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _engine_builds_cla_contexts(model):
                super().__init__(text_generation_controller, *args, **kwargs)
        for w in caught:
            if "Error initializing dynamic engine" in str(w.message):
                raise RuntimeError(f"CLAStaticInferenceEngine: {w.message}")
            if not issubclass(w.category, DeprecationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if self.legacy != legacy:
            raise RuntimeError("CLAStaticInferenceEngine did not build the requested engine.")


def build_static_engine(
    model: Any,
    tokenizer: Any,
    *,
    vocab_size: int,
    max_batch_size: int,
    max_sequence_length: int,
    legacy: bool = False,
    buffer_size_gb: float = 40.0,
) -> CLAStaticInferenceEngine:
    """``StaticInferenceEngine`` for a CLA model: ``legacy=True`` uses the static per-layer
    cache (consumers allocate nothing), otherwise the CLA paged cache."""
    context = StaticInferenceContext(max_batch_size, max_sequence_length)
    wrapper = inference_wrapper(
        model,
        context,
        max_requests=max_batch_size,
        max_sequence_length=max_sequence_length,
        vocab_size=vocab_size,
    )
    controller = TextGenerationController(wrapper, tokenizer)
    return CLAStaticInferenceEngine(
        controller,
        max_batch_size=max_batch_size,
        legacy=legacy,
        buffer_size_gb=buffer_size_gb,
    )
