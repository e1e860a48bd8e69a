"""Greedy generation through Megatron-Core's inference stack, on one rank or several.

Every function builds the tiny CLA GPT of ``model`` (keyword overrides of ``tiny_config``), runs
one way of KV-cached greedy decoding, and returns the generated tokens together with the ground
truth: greedy decoding by full no-cache forwards of the same model (``greedy_reference``).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.sampling_params import SamplingParams

from megatron_cla.inference.engines import build_dynamic_engine, build_static_engine
from megatron_cla.testing import model_parallel
from tests.helpers import VOCAB, IdTokenizer, build_cla_gpt, greedy_reference, tiny_config

STEPS = 6
MAX_SEQ = 48


def prompts(lengths: tuple[int, ...] = (5, 9, 3), seed: int = 0) -> list[list[int]]:
    """Ragged prompts of random token ids (never the end-of-document id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


def _greedy() -> SamplingParams:
    """Exactly STEPS greedy tokens: never stop at the end-of-document id.

    The dynamic engines honour ``termination_id=-1``; the legacy static controller ignores
    it and reads ``no_early_termination`` (not a dataclass field, looked up by getattr).
    """
    params = SamplingParams(num_tokens_to_generate=STEPS, top_k=1, termination_id=-1)
    params.no_early_termination = True
    return params


def _model(model: dict) -> Any:
    """The tiny GPT of ``model`` (overrides of ``tiny_config``), or a HybridModel when it has a
    ``hybrid_layer_pattern`` (Mamba slots hold the CPU stand-in mixer)."""
    pattern = model.get("hybrid_layer_pattern")
    if pattern is None:
        return build_cla_gpt(tiny_config(**model)).eval()
    from tests.hybrid_helpers import build_cla_hybrid, tiny_hybrid_config

    settings = {k: v for k, v in model.items() if k != "hybrid_layer_pattern"}
    return build_cla_hybrid(tiny_hybrid_config(pattern, **settings)).eval()


def _references(net: Any, batch: list[list[int]]) -> list[list[int]]:
    return [greedy_reference(net, p, STEPS) for p in batch]


def static_context_decode(net: Any, batch: list[list[int]]) -> dict:
    """Prefill + decode with a ``StaticInferenceContext`` (equal-length prompts), by hand."""
    tokens = torch.tensor(batch)
    b, n = tokens.shape
    ctx = StaticInferenceContext(b, MAX_SEQ)
    generated = []
    with torch.no_grad():
        step_tokens, positions = tokens, torch.arange(n).expand(b, -1)
        mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
        for _ in range(STEPS):
            logits = net(
                step_tokens, positions, mask, inference_context=ctx, runtime_gather_output=True
            )
            ctx.sequence_len_offset += step_tokens.shape[1]
            step_tokens = logits[:, -1].argmax(-1, keepdim=True)
            positions = torch.full((b, 1), ctx.sequence_len_offset)
            mask = None
            generated.append(step_tokens[:, 0].tolist())
    kv = {n: entry for n, entry in ctx.key_value_memory_dict.items() if isinstance(entry, tuple)}
    return {
        "generated": [list(t) for t in zip(*generated, strict=True)],
        "cached_layers": sorted(kv),
        "cached_bytes": sum(k.numel() * k.element_size() * 2 for k, _ in kv.values()),
        # Mamba-slot layers keep their recurrent state in the same dict (a tensor, not K/V)
        "state_layers": sorted(set(ctx.key_value_memory_dict) - set(kv)),
    }


def dynamic_engine_generate(net: Any, batch: list[list[int]], buffer_gb: float = 0.0005) -> dict:
    """``DynamicInferenceEngine`` over the CLA paged cache, requests added together."""
    engine = build_dynamic_engine(
        net,
        IdTokenizer(),
        vocab_size=VOCAB,
        max_sequence_length=MAX_SEQ,
        buffer_size_gb=buffer_gb,
        block_size_tokens=16,
        max_requests=4,
        max_tokens=64,
    )
    for i, p in enumerate(batch):
        engine.add_request(i, p, _greedy())
    finished = []
    while engine.has_unfinished_requests():
        result = engine.step_modern()
        finished += result.get("finished_request_records", result.get("finished_requests", []))
    by_id = {}
    for record in finished:
        request = _request(record)
        by_id[int(request.request_id)] = [int(t) for t in request.generated_tokens]
    ctx = engine.context
    return {
        "generated": [by_id[i] for i in range(len(batch))],
        "kv_slots": ctx.num_attention_layers,
        "layer_map": dict(ctx.layer_map),
        "kv_bytes": ctx.kv_cache_bytes,
        "block_bytes": ctx.block_size_bytes,
    }


def static_engine_generate(net: Any, batch: list[list[int]], legacy: bool) -> dict:
    """Megatron's ``StaticInferenceEngine`` (legacy per-layer cache, or its paged default)."""
    engine = build_static_engine(
        net,
        IdTokenizer(),
        vocab_size=VOCAB,
        max_batch_size=len(batch),
        max_sequence_length=MAX_SEQ,
        legacy=legacy,
        buffer_size_gb=0.005,  # Megatron's static engine uses 256-token blocks
    )
    texts = [IdTokenizer().detokenize(p) for p in batch]
    requests = sorted(
        map(_request, engine.generate(prompts=texts, sampling_params=_greedy())),
        key=lambda r: int(r.request_id),
    )
    return {"generated": [[int(t) for t in r.generated_tokens] for r in requests]}


def _request(record: Any) -> Any:
    """The request of a result (megatron-core >= 0.16 returns records of request snapshots)."""
    return record.merge() if hasattr(record, "merge") else record


def context_layout(net: Any, batch: list[list[int]]) -> dict:
    """The CLA paged context of a hybrid model next to Megatron's own (0.17+ constructor)."""
    from megatron.core.inference.config import InferenceConfig, MambaInferenceStateConfig
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext

    from megatron_cla.inference import CLADynamicInferenceContext

    settings = dict(max_sequence_length=MAX_SEQ, buffer_size_gb=0.0005, block_size_tokens=16)
    cla = CLADynamicInferenceContext.for_model(net, **settings)
    mamba = MambaInferenceStateConfig.from_model(net)
    stock = DynamicInferenceContext(
        net.config, InferenceConfig(mamba_inference_state_config=mamba, **settings)
    )
    types = net.decoder.layer_type_list

    def layout(ctx: Any) -> dict:
        states = (ctx.mamba_conv_states, ctx.mamba_ssm_states)
        allocator = getattr(ctx, "kv_block_allocator", None) or ctx.block_allocator
        return {
            "kv_layers": ctx.num_attention_layers,
            "block_bytes": ctx.block_size_bytes,
            "total_blocks": allocator.total_count,
            "buffer_bytes": int(0.0005 * 1024**3),
            "max_requests": ctx.max_requests,
            "mamba_layers": ctx.num_mamba_layers,
            "mamba_map": {k: v for k, v in ctx.layer_map.items() if types[k] == "M"},
            "mamba_state_bytes": sum(t.numel() * t.element_size() for t in states),
        }

    return {"generated": [], "cla": layout(cla), "stock": layout(stock)}


RUNNERS = {
    "static-context": static_context_decode,
    "dynamic-engine": dynamic_engine_generate,
    "static-engine": lambda net, batch: static_engine_generate(net, batch, legacy=False),
    "static-engine-legacy": lambda net, batch: static_engine_generate(net, batch, legacy=True),
    "context-layout": context_layout,
}


def generate_on_rank(runner: str, model: dict, batch: list[list[int]], tp: int = 1) -> dict:
    """Run ``RUNNERS[runner]`` on this rank's shard of a TP-``tp`` model; add the reference."""
    with model_parallel(tensor_model_parallel_size=tp):
        net = _model({**model, "tensor_model_parallel_size": tp})
        reference = _references(net, batch)  # before any engine marks the model as serving
        try:
            out = RUNNERS[runner](net, batch)
        finally:
            _leave_inference_mode()
    return {**out, "reference": reference}


def suppressed_rows(tp: int, keep: int) -> dict:
    """Which logits of the tiny CLA2 GPT (at TP ``tp``) ``suppress_rows_without_text`` leaves
    finite when the tokenizer has ``keep`` ids (gathered over the TP ranks)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_cla.inference.generation import suppress_rows_without_text

    with model_parallel(tensor_model_parallel_size=tp):
        net = _model({"tensor_model_parallel_size": tp, "cla_share_factor": 2})
        suppress_rows_without_text(net, keep)
        tokens = torch.tensor(prompts((7,)))
        with torch.no_grad():
            logits = net(tokens, torch.arange(tokens.shape[1])[None], None)
            full = gather_from_tensor_model_parallel_region(logits)
    return {
        "width": full.shape[-1],
        "finite": torch.isfinite(full).all(dim=(0, 1)).tolist(),
        "minus_inf": torch.isneginf(full).all(dim=(0, 1)).tolist(),
    }


def _leave_inference_mode() -> None:
    """megatron-core >= 0.17 engines set a process-wide inference flag; later tests train."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return
    InferenceMode.unset_active()


def allocated_paged_cache(overrides: list[str], buffer_gb: float, block_tokens: int) -> dict:
    """What Megatron's paged context allocates for a launcher config on this rank (any TP/PP)."""
    from megatron.core import parallel_state as ps

    from megatron_cla.inference import CLADynamicInferenceContext
    from megatron_cla.testing import init_process_group_once, model_parallel
    from megatron_cla.training.config import load_config
    from megatron_cla.training.model import build_model_chunk
    from megatron_cla.training.plan import make_plan

    cfg = load_config(None, overrides)
    p = cfg.parallel
    plan = make_plan(cfg, p.tensor * p.pipeline, on_gpu=False)
    init_process_group_once()
    with model_parallel(
        tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline
    ):
        model = build_model_chunk(plan, 512)
        ctx = CLADynamicInferenceContext.for_model(
            model, max_sequence_length=512, buffer_size_gb=buffer_gb, block_size_tokens=block_tokens
        )
        allocator = getattr(ctx, "kv_block_allocator", None) or ctx.block_allocator
        return {
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "kv_layers": ctx.num_attention_layers,
            "block_bytes": ctx.block_size_bytes,
            "total_blocks": allocator.total_count,
            "kv_bytes": ctx.kv_cache_bytes,
        }
