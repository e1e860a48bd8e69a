"""Parameters, FLOPs/token, KV bytes/token and step time: CLA2 vs S=1 vs Megatron's stock spec.

All three models are measured in one run on the same machine, interleaved step by step (so drifts
in machine load hit them equally), and reported as ratios:

* ``CLA2 / S=1``  -- what sharing K/V buys in step time (expected <= 1.0: consumers skip the K/V
  GEMMs);
* ``S=1 / stock`` -- the overhead of the CLA code path when nothing is shared (expected ~1.00).

Runs on CPU (gloo) or on one GPU. On a GPU with Transformer Engine, ``--te`` uses the TE specs
(fused attention, layernorm-fused linears), ``--fp8 RECIPE`` FP8 GEMMs, and ``--sequential`` builds
and times one model at a time so that each gets the whole GPU and its own peak memory. Example::

    python benchmarks/cla_step_time.py                      # tiny default, a minute on a laptop
    python benchmarks/cla_step_time.py --hidden 2048 --layers 20 --heads 16 --seq 2048  # 1B-ish
    python benchmarks/cla_step_time.py --te --sequential --hidden 2048 --layers 24 --heads 16 \
        --seq 4096 --batch 8 --vocab 32000                  # fills an 80 GB H100
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_cla import CLATransformerConfig, get_cla_decoder_block_spec  # noqa: E402
from megatron_cla.accounting import (  # noqa: E402
    DecoderShape,
    flops_per_token,
    kv_cache_bytes_per_token,
)
from megatron_cla.testing import (  # noqa: E402
    device,
    enable_megatron_on_cpu,
    init_process_group_once,
    model_parallel,
)


def model_arguments(doc: str, layers_help: str = "decoder layers") -> argparse.ArgumentParser:
    """The model, batch and timing options both step-time benchmarks take."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help=layers_help)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=1, help="KV heads (1 = MQA)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=15, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--te", action="store_true", help="Transformer Engine specs (GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def _args() -> argparse.Namespace:
    p = model_arguments(__doc__)
    p.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--fp8", default=None, help="FP8 recipe with --te: delayed, tensorwise, ...")
    p.add_argument("--sequential", action="store_true", help="one model at a time (GPU memory)")
    a = p.parse_args()
    if (a.te or a.fp8) and not torch.cuda.is_available():
        p.error("--te and --fp8 need a GPU")
    if a.fp8 and not a.te:
        p.error("--fp8 needs --te (the local spec has no FP8 GEMMs)")
    return a


def model_config(
    a: argparse.Namespace, share_factor: int, **overrides: object
) -> CLATransformerConfig:
    """The benchmark model (SwiGLU, RMSNorm, no biases or dropout; bf16 on a GPU)."""
    on_gpu = torch.cuda.is_available()
    settings: dict = dict(
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        num_query_groups=a.groups,
        ffn_hidden_size=getattr(a, "ffn", None) or 4 * a.hidden,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        cla_share_factor=share_factor,
        transformer_impl="transformer_engine" if a.te else "local",
        masked_softmax_fusion=False,  # Megatron's fused softmax kernels are not in the wheel
        **(dict(fp8="hybrid", fp8_recipe=a.fp8) if getattr(a, "fp8", None) else {}),
    )
    return CLATransformerConfig(**{**settings, **overrides})


def _model(config: CLATransformerConfig, spec, a: argparse.Namespace) -> torch.nn.Module:
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(1)
    model = GPTModel(
        config, spec, vocab_size=a.vocab, max_sequence_length=a.seq, position_embedding_type="rope"
    )
    return model.to(device())


def _batch(a: argparse.Namespace) -> dict:
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
    mask = torch.ones(1, 1, a.seq, a.seq, dtype=torch.bool).triu(1)
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, -1)
    return {
        k: v.to(device())
        for k, v in dict(
            tokens=tokens[:, :-1], labels=tokens[:, 1:], position_ids=pos, attention_mask=mask
        ).items()
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_step(model, optimizer, batch) -> float:
    _sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = (
        model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
        )
        .float()
        .mean()
    )
    loss.backward()
    optimizer.step()
    _sync()
    return time.perf_counter() - start


def _specs(a: argparse.Namespace) -> dict[str, tuple[CLATransformerConfig, object]]:
    cla1, cla2 = model_config(a, 1), model_config(a, 2)
    stock = get_gpt_decoder_block_spec(cla1, a.te, normalization="RMSNorm")
    return {
        "stock": (cla1, stock),
        "S=1": (cla1, get_cla_decoder_block_spec(cla1, use_transformer_engine=a.te)),
        "CLA2": (cla2, get_cla_decoder_block_spec(cla2, use_transformer_engine=a.te)),
    }


def time_interleaved(a: argparse.Namespace, models: dict) -> dict[str, list[float]]:
    """All models resident, one step of each in turn: load drifts hit all models alike."""
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    batch = _batch(a)
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(a.warmup + a.steps):
        for name, model in models.items():
            elapsed = _train_step(model, optimizers[name], batch)
            if step >= a.warmup:
                times[name].append(elapsed)
    return times


def _time_interleaved(a: argparse.Namespace, specs: dict) -> tuple[dict, dict]:
    models = {k: _model(config, spec, a) for k, (config, spec) in specs.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    return time_interleaved(a, models), {k: {"params": n} for k, n in params.items()}


def _time_sequential(a: argparse.Namespace, specs: dict) -> tuple[dict, dict]:
    """One model at a time on the GPU: its step times and its own peak memory."""
    times, extra = {}, {}
    batch = _batch(a)
    for name, (config, spec) in specs.items():
        model = _model(config, spec, a)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
        steps = [_train_step(model, optimizer, batch) for _ in range(a.warmup + a.steps)]
        times[name] = steps[a.warmup :]
        extra[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        }
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
    return times, extra


def main() -> None:
    a = _args()
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    init_process_group_once()
    with model_parallel():
        specs = _specs(a)
        measure = _time_sequential if a.sequential and torch.cuda.is_available() else None
        times, extra = (measure or _time_interleaved)(a, specs)
    rows = {}
    for name, (config, _) in specs.items():
        shape = DecoderShape.from_config(config, config.cla_sharing)
        rows[name] = dict(
            **extra[name],
            flops_per_token=flops_per_token(shape, a.seq, a.vocab),
            kv_bytes_per_token=kv_cache_bytes_per_token(shape),
            step_ms=1000 * statistics.median(times[name]),
            step_ms_iqr=[1000 * q for q in statistics.quantiles(times[name], n=4)[::2]],
        )
    _report(a, rows)


def _report(a: argparse.Namespace, rows: dict) -> None:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    backend = ("TE" if a.te else "local") + (f" + FP8 {a.fp8}" if a.fp8 else "")
    print(
        f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"{backend} spec; {'sequential' if a.sequential else 'interleaved'}"
    )
    print(
        f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, {a.groups} KV heads, "
        f"seq {a.seq}, batch {a.batch}; median of {a.steps} steps after {a.warmup} warm-up"
    )
    print(
        f"{'model':<6} {'params':>14} {'FLOPs/token':>15} {'KV B/token':>11} {'step ms':>9} "
        f"{'(p25-p75)':>15} {'peak GB':>8}"
    )
    for name, r in rows.items():
        low, high = r["step_ms_iqr"]
        peak = f"{r['peak_memory_gb']:8.2f}" if "peak_memory_gb" in r else f"{'-':>8}"
        print(
            f"{name:<6} {r['params']:>14,} {r['flops_per_token']:>15,} "
            f"{r['kv_bytes_per_token']:>11,} {r['step_ms']:>9.1f} {low:>7.1f}-{high:<7.1f} {peak}"
        )
    ratios = {
        "CLA2/S=1 params": rows["CLA2"]["params"] / rows["S=1"]["params"],
        "CLA2/S=1 FLOPs/token": rows["CLA2"]["flops_per_token"] / rows["S=1"]["flops_per_token"],
        "CLA2/S=1 KV bytes/token": rows["CLA2"]["kv_bytes_per_token"]
        / rows["S=1"]["kv_bytes_per_token"],
        "CLA2/S=1 step time": rows["CLA2"]["step_ms"] / rows["S=1"]["step_ms"],
        "S=1/stock step time": rows["S=1"]["step_ms"] / rows["stock"]["step_ms"],
    }
    if "peak_memory_gb" in rows["CLA2"]:
        ratios["CLA2/S=1 peak memory"] = (
            rows["CLA2"]["peak_memory_gb"] / rows["S=1"]["peak_memory_gb"]
        )
        ratios["S=1/stock peak memory"] = (
            rows["S=1"]["peak_memory_gb"] / rows["stock"]["peak_memory_gb"]
        )
    for name, value in ratios.items():
        print(f"{name:<26} {value:.3f}")
    write_json(a, where, rows, ratios)


def write_json(a: argparse.Namespace, device_name: str, rows: dict, ratios: dict) -> None:
    """The run's arguments, device, rows and ratios to ``--json`` (when given)."""
    if a.json:
        result = dict(args=vars(a) | {"json": str(a.json)}, device=device_name, rows=rows)
        a.json.write_text(json.dumps(result | {"ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
