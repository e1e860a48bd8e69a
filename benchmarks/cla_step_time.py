"""Parameters, FLOPs/token, KV bytes/token and step time: CLA2 vs S=1 vs Megatron's stock spec.

All three models are measured in one run on the same machine, interleaved step by step (so drifts
in machine load hit them equally), and reported as ratios:

* ``CLA2 / S=1``  -- what sharing K/V buys in step time (expected <= 1.0: consumers skip the K/V
  GEMMs);
* ``S=1 / stock`` -- the overhead of the CLA code path when nothing is shared (expected ~1.00).

Runs on CPU (gloo) or on one GPU. Example::

    python benchmarks/cla_step_time.py                      # tiny default, a minute on a laptop
    python benchmarks/cla_step_time.py --hidden 2048 --layers 20 --heads 16 --seq 2048  # 1B-ish
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


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=1, help="KV heads (1 = MQA)")
    p.add_argument("--ffn", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=15, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def _config(a: argparse.Namespace, share_factor: int) -> CLATransformerConfig:
    on_gpu = torch.cuda.is_available()
    return CLATransformerConfig(
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        num_query_groups=a.groups,
        ffn_hidden_size=a.ffn or 4 * a.hidden,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=on_gpu,
        params_dtype=torch.bfloat16 if on_gpu else torch.float32,
        cla_share_factor=share_factor,
    )


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


def main() -> None:
    a = _args()
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    init_process_group_once()
    with model_parallel():
        cla1, cla2 = _config(a, 1), _config(a, 2)
        stock_spec = get_gpt_decoder_block_spec(cla1, False, normalization="RMSNorm")
        models = {
            "stock": _model(cla1, stock_spec, a),
            "S=1": _model(cla1, get_cla_decoder_block_spec(cla1, use_transformer_engine=False), a),
            "CLA2": _model(cla2, get_cla_decoder_block_spec(cla2, use_transformer_engine=False), a),
        }
        optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
        batch = _batch(a)
        times: dict[str, list[float]] = {k: [] for k in models}
        for step in range(a.warmup + a.steps):
            for name, model in models.items():  # interleaved: load drifts hit all models alike
                elapsed = _train_step(model, optimizers[name], batch)
                if step >= a.warmup:
                    times[name].append(elapsed)
    configs = {"stock": cla1, "S=1": cla1, "CLA2": cla2}
    rows = {}
    for name, model in models.items():
        shape = DecoderShape.from_config(configs[name], configs[name].cla_sharing)
        rows[name] = dict(
            params=sum(p.numel() for p in model.parameters()),
            flops_per_token=flops_per_token(shape, a.seq, a.vocab),
            kv_bytes_per_token=kv_cache_bytes_per_token(shape),
            step_ms=1000 * statistics.median(times[name]),
            step_ms_iqr=[1000 * q for q in statistics.quantiles(times[name], n=4)[::2]],
        )
    _report(a, rows)


def _report(a: argparse.Namespace, rows: dict) -> None:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(
        f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, {a.groups} KV heads, "
        f"seq {a.seq}, batch {a.batch}; median of {a.steps} steps after {a.warmup} warm-up"
    )
    print(
        f"{'model':<6} {'params':>12} {'FLOPs/token':>14} {'KV B/token':>11} {'step ms':>9} "
        f"{'(p25-p75)':>15}"
    )
    for name, r in rows.items():
        low, high = r["step_ms_iqr"]
        print(
            f"{name:<6} {r['params']:>12,} {r['flops_per_token']:>14,} "
            f"{r['kv_bytes_per_token']:>11,} {r['step_ms']:>9.1f} {low:>7.1f}-{high:<7.1f}"
        )
    ratios = {
        "CLA2/S=1 params": rows["CLA2"]["params"] / rows["S=1"]["params"],
        "CLA2/S=1 FLOPs/token": rows["CLA2"]["flops_per_token"] / rows["S=1"]["flops_per_token"],
        "CLA2/S=1 KV bytes/token": rows["CLA2"]["kv_bytes_per_token"]
        / rows["S=1"]["kv_bytes_per_token"],
        "CLA2/S=1 step time": rows["CLA2"]["step_ms"] / rows["S=1"]["step_ms"],
        "S=1/stock step time": rows["S=1"]["step_ms"] / rows["stock"]["step_ms"],
    }
    for name, value in ratios.items():
        print(f"{name:<26} {value:.3f}")
    if a.json:
        a.json.write_text(
            json.dumps(
                dict(args=vars(a) | {"json": str(a.json)}, device=where, rows=rows, ratios=ratios),
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
