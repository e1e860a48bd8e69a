"""Inference with CLA2 vs S=1 through Megatron-Core's engines: KV memory, concurrency, decode speed.

Both models (same shape, MQA; CLA2 shares each producer's K/V with the next layer) are measured
in one run on this machine and reported as CLA2 / S=1 ratios:

* allocated KV bytes -- of the static cache after a prefill, and per paged block;
* max concurrent requests -- peak number of requests the ``DynamicInferenceEngine`` runs at once
  with the same fixed KV buffer, every request fitting in one block (expected ~2x);
* decode tokens/s -- a batch of requests decoded by the dynamic engine, repetitions interleaved
  between the models, median (memory-bound on a GPU at long context; compute-bound on a CPU).

    python benchmarks/cla_inference.py                       # CPU, a few minutes
    python benchmarks/cla_inference.py --json benchmarks/results/cpu_inference.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.inference.contexts import StaticInferenceContext  # noqa: E402
from megatron.core.inference.sampling_params import SamplingParams  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402

from megatron_cla import CLATransformerConfig, get_cla_decoder_block_spec  # noqa: E402
from megatron_cla.inference.engines import build_dynamic_engine  # noqa: E402
from megatron_cla.testing import (  # noqa: E402
    device,
    enable_megatron_on_cpu,
    init_process_group_once,
    model_parallel,
)


class _IdTokenizer:
    """Token ids are the text: the benchmark never needs words."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.eod = vocab, vocab - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: list[int], **_: object) -> str:
        return " ".join(str(int(t)) for t in ids)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=1, help="KV heads (1 = MQA)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--batch", type=int, default=16, help="requests in the decode-speed run")
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs per model")
    p.add_argument("--buffer-mb", type=float, default=32.0, help="fixed KV buffer (concurrency)")
    p.add_argument("--block", type=int, default=256, help="tokens per KV block")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def _model(a: argparse.Namespace, share_factor: int) -> torch.nn.Module:
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    config = CLATransformerConfig(
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        num_query_groups=a.groups,
        add_bias_linear=False,
        normalization="RMSNorm",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        cla_share_factor=share_factor,
    )
    torch.manual_seed(0)
    model = GPTModel(
        config,
        get_cla_decoder_block_spec(config, use_transformer_engine=False),
        vocab_size=a.vocab,
        max_sequence_length=a.prompt + a.new_tokens,
        position_embedding_type="rope",
    )
    return model.to(device(), dtype).eval()


def _prompts(a: argparse.Namespace, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, a.vocab - 1, (count, a.prompt), generator=g).tolist()


def _engine(model: torch.nn.Module, a: argparse.Namespace, buffer_gb: float, max_requests=None):
    return build_dynamic_engine(
        model,
        _IdTokenizer(a.vocab),
        vocab_size=a.vocab,
        max_sequence_length=a.prompt + a.new_tokens,
        buffer_size_gb=buffer_gb,
        block_size_tokens=a.block,
        max_requests=max_requests,  # None: one request per block, as Megatron defaults
    )


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(num_tokens_to_generate=a.new_tokens, top_k=1, termination_id=-1)


def static_cache_bytes(model: torch.nn.Module, a: argparse.Namespace) -> int:
    """Bytes Megatron's static per-layer cache holds after prefilling ``batch`` prompts."""
    ctx = StaticInferenceContext(a.batch, a.prompt + a.new_tokens)
    tokens = torch.tensor(_prompts(a, a.batch), device=device())
    positions = torch.arange(a.prompt, device=device()).expand(a.batch, -1)
    with torch.no_grad():
        model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
    return sum(k.numel() * k.element_size() * 2 for k, _ in ctx.key_value_memory_dict.values())


def peak_concurrency(model: torch.nn.Module, a: argparse.Namespace) -> tuple[int, int, int]:
    """(peak running requests, usable blocks, block bytes) with a fixed ``--buffer-mb`` buffer."""
    engine = _engine(model, a, a.buffer_mb / 1024)
    ctx = engine.context
    usable = ctx.kv_cache_bytes // ctx.block_size_bytes - 1
    for i, prompt in enumerate(_prompts(a, 2 * usable + 8)):
        engine.add_request(i, prompt, _params(a))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step_modern()
        peak = max(peak, ctx.total_request_count - ctx.paused_request_count)
    return peak, usable, ctx.block_size_bytes


def decode_seconds(model: torch.nn.Module, a: argparse.Namespace) -> float:
    """Wall time of serving ``--batch`` requests to completion."""
    engine = _engine(model, a, 0.25, max_requests=a.batch)
    for i, prompt in enumerate(_prompts(a, a.batch)):
        engine.add_request(i, prompt, _params(a))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step_modern()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    a = _args()
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    init_process_group_once()
    rows: dict[str, dict] = {}
    with model_parallel():
        models = {"S=1": _model(a, 1), "CLA2": _model(a, 2)}
        for name, model in models.items():
            peak, usable, block_bytes = peak_concurrency(model, a)
            rows[name] = {
                "static_cache_bytes": static_cache_bytes(model, a),
                "block_bytes": block_bytes,
                "usable_blocks": usable,
                "peak_concurrent_requests": peak,
                "decode_seconds": [],
            }
        for model in models.values():  # warm-up
            decode_seconds(model, a)
        for _ in range(a.repeats):
            for name, model in models.items():
                rows[name]["decode_seconds"].append(decode_seconds(model, a))
    _report(a, rows)


def _report(a: argparse.Namespace, rows: dict) -> None:
    tokens = a.batch * a.new_tokens
    for row in rows.values():
        row["decode_tokens_per_s"] = tokens / statistics.median(row["decode_seconds"])
    one, two = rows["S=1"], rows["CLA2"]
    ratios = {
        "static cache bytes": two["static_cache_bytes"] / one["static_cache_bytes"],
        "paged block bytes": two["block_bytes"] / one["block_bytes"],
        "peak concurrent requests": two["peak_concurrent_requests"]
        / one["peak_concurrent_requests"],
        "decode tokens/s": two["decode_tokens_per_s"] / one["decode_tokens_per_s"],
    }
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{where} | {a.layers} layers, hidden {a.hidden}, {a.heads} heads, {a.groups} KV "
        f"head(s) | prompt {a.prompt} + {a.new_tokens} new tokens | buffer {a.buffer_mb} MB"
    )
    for name, row in rows.items():
        print(
            f"{name:>5}: static cache {row['static_cache_bytes']:,} B | block "
            f"{row['block_bytes']:,} B, {row['usable_blocks']} usable | peak "
            f"{row['peak_concurrent_requests']} concurrent requests | decode "
            f"{row['decode_tokens_per_s']:,.0f} tokens/s ({a.batch} requests)"
        )
    for what, value in ratios.items():
        print(f"CLA2/S=1 {what}: {value:.3f}")
    if a.json is not None:
        a.json.write_text(
            json.dumps(
                {
                    "args": vars(a) | {"json": str(a.json)},
                    "device": where,
                    "rows": rows,
                    "ratios": ratios,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
