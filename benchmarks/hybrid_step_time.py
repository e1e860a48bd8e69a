"""HybridModel CLA2 vs HybridModel S=1 vs GPTModel CLA2: step time and KV bytes, in one run.

The three models are the same network (``*-`` per GPT layer unless ``--pattern`` says otherwise),
built with megatron_cla's hybrid stack spec and GPT block spec, timed interleaved step by step
(forward + backward + AdamW) so that machine-load drifts hit them alike, and reported as ratios:

* ``hybrid CLA2 / hybrid S=1`` -- what sharing K/V over the attention layers buys (<= 1.0);
* ``hybrid CLA2 / GPT CLA2``   -- the cost of the hybrid stack's own layer loop (~1.00).

KV bytes per token are counted (the paper's formula over producer attention layers) and measured:
the bytes a Megatron ``StaticInferenceContext`` holds after one prefill, per cached token.

    python benchmarks/hybrid_step_time.py                      # tiny default, CPU, ~2 minutes
    python benchmarks/hybrid_step_time.py --te --pattern "M-M-M*-M-M-M*-" --hidden 2048 ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_cla.cli.common import quiet_library_startup  # noqa: E402

quiet_library_startup()  # before Megatron's import-time notices

from benchmarks.cla_step_time import (  # noqa: E402
    _batch,
    model_arguments,
    model_config,
    time_interleaved,
    write_json,
)
from megatron_cla import CLATransformerConfig  # noqa: E402
from megatron_cla.accounting import DecoderShape, kv_cache_bytes_per_token  # noqa: E402
from megatron_cla.testing import (  # noqa: E402
    device,
    enable_megatron_on_cpu,
    init_process_group_once,
    model_parallel,
)


def _args() -> argparse.Namespace:
    p = model_arguments(__doc__, layers_help="GPT layers; the hybrid is '*-' x this")
    p.add_argument("--pattern", default=None, help="hybrid pattern instead (no GPT twin then)")
    a = p.parse_args()
    if a.te and not torch.cuda.is_available():
        p.error("--te needs a GPU")
    return a


def _config(a: argparse.Namespace, share_factor: int, pattern: str | None):
    if pattern is None:
        return model_config(a, share_factor)
    layers = len(pattern.replace("|", ""))
    return model_config(a, share_factor, num_layers=layers, hybrid_layer_pattern=pattern)


def _models(a: argparse.Namespace) -> dict[str, tuple[CLATransformerConfig, torch.nn.Module]]:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_cla import get_cla_decoder_block_spec
    from megatron_cla.hybrid import get_cla_hybrid_stack_spec

    common = dict(vocab_size=a.vocab, max_sequence_length=a.seq, position_embedding_type="rope")
    pattern = a.pattern or "*-" * a.layers
    models = {}
    for name, share in (("hybrid S=1", 1), ("hybrid CLA2", 2)):
        config = _config(a, share, pattern)
        model_parallel_cuda_manual_seed(1)
        spec = get_cla_hybrid_stack_spec(use_transformer_engine=a.te)
        models[name] = (config, HybridModel(config, spec, hybrid_layer_pattern=pattern, **common))
    if a.pattern is None:
        config = _config(a, 2, None)
        model_parallel_cuda_manual_seed(1)
        spec = get_cla_decoder_block_spec(config, use_transformer_engine=a.te)
        models["GPT CLA2"] = (config, GPTModel(config, spec, **common))
    return {k: (c, m.to(device())) for k, (c, m) in models.items()}


def _measured_kv_bytes_per_token(model: torch.nn.Module, a: argparse.Namespace) -> float:
    """K/V bytes a StaticInferenceContext holds after one prefill, per cached token."""
    from megatron.core.inference.contexts import StaticInferenceContext

    batch = _batch(a)
    ctx = StaticInferenceContext(a.batch, a.seq)
    model.eval()
    with torch.no_grad():
        model(
            batch["tokens"],
            batch["position_ids"],
            batch["attention_mask"],
            **{"inference_context": ctx},
        )
    model.train()
    kv = [e for e in ctx.key_value_memory_dict.values() if isinstance(e, tuple)]
    cached = sum(t.numel() * t.element_size() for pair in kv for t in pair)
    return cached / (a.batch * a.seq)


def main() -> None:
    a = _args()
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    init_process_group_once()
    with model_parallel():
        models = _models(a)
        rows = {}
        for name, (config, model) in models.items():
            shape = DecoderShape.from_config(config, config.cla_sharing)
            element = 2 if torch.cuda.is_available() else 4
            rows[name] = dict(
                params=sum(p.numel() for p in model.parameters()),
                kv_bytes_per_token=kv_cache_bytes_per_token(shape, element),
                kv_bytes_per_token_measured=_measured_kv_bytes_per_token(model, a),
            )
        times = time_interleaved(a, {k: m for k, (_, m) in models.items()})
    for name, row in rows.items():
        row["step_ms"] = 1000 * statistics.median(times[name])
        row["step_ms_iqr"] = [1000 * q for q in statistics.quantiles(times[name], n=4)[::2]]
    _report(a, rows)


def _ratio(rows: dict, a: str, b: str, key: str) -> float:
    return rows[a][key] / rows[b][key]


def _report(a: argparse.Namespace, rows: dict) -> None:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    pattern = a.pattern or "*-" * a.layers
    print(
        f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"{'TE' if a.te else 'local'} spec; pattern '{pattern}'"
    )
    print(
        f"model: hidden {a.hidden}, {a.heads} heads, {a.groups} KV heads, seq {a.seq}, batch "
        f"{a.batch}; median of {a.steps} interleaved steps after {a.warmup} warm-up"
    )
    print(f"{'model':<12} {'params':>12} {'KV B/token':>11} {'measured':>9} {'step ms':>9} p25-p75")
    for name, r in rows.items():
        low, high = r["step_ms_iqr"]
        print(
            f"{name:<12} {r['params']:>12,} {r['kv_bytes_per_token']:>11,} "
            f"{r['kv_bytes_per_token_measured']:>9,.0f} {r['step_ms']:>9.1f} {low:.1f}-{high:.1f}"
        )
    pairs = [("hybrid CLA2", "hybrid S=1")]
    if "GPT CLA2" in rows:
        pairs.append(("hybrid CLA2", "GPT CLA2"))
    ratios = {}
    for x, y in pairs:
        for key, label in (
            ("step_ms", "step time"),
            ("kv_bytes_per_token_measured", "KV bytes/token (measured)"),
            ("params", "params"),
        ):
            ratios[f"{x} / {y} {label}"] = _ratio(rows, x, y, key)
    for name, value in ratios.items():
        print(f"{name:<50} {value:.3f}")
    write_json(a, where, rows, ratios)


if __name__ == "__main__":
    main()
