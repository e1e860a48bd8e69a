"""Peak memory of ``import-hf``, ``convert to-cla`` and ``export-hf`` per rank, at 1 and 2 ranks.

A random-weight ``LlamaForCausalLM`` of about 200 M parameters (bf16 safetensors, its own
tokenizer) is imported, converted to CLA2 and exported again, each command run as a user runs it
(one process, then ``torchrun --nproc-per-node 2``) in the same invocation. Every rank records
its resident memory after the libraries are imported (the baseline; the peak is reset there,
Linux ``clear_refs``) and its peak at the end (``VmHWM``); the report is the largest peak over
baseline of any rank, divided by the model's bf16 bytes (helper processes a rank starts are
reported apart). Targets (issue 18): <= 1.5 at 1 rank, about half of that per rank at 2.

    python benchmarks/hf_io_memory.py                      # a few minutes on a laptop CPU
    python benchmarks/hf_io_memory.py --json benchmarks/results/cpu_hf_io_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORDS = "HF_IO_MEMORY_RECORDS"
"""The directory where every rank writes its record (``rankN.json``)."""


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux ``clear_refs`` 5): the imports' own
    transient peak is not the command's."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(argv: list[str]) -> None:
    """Run ``megatron-cla ARGV`` in this process; print the rank's baseline and peak."""
    import megatron.core  # noqa: F401  (the libraries every command imports, in the baseline)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from megatron_cla.cli.main import main

    _reset_peak()
    baseline = _status_mib("VmRSS")
    code = 0
    try:
        main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    rank = int(os.environ.get("RANK", 0))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # helper processes
    record = {
        "rank": rank,
        "baseline_mib": baseline,
        "peak_mib": _status_mib("VmHWM"),
        "helper_peak_mib": children,
        "exit": code,
    }
    Path(os.environ[RECORDS], f"rank{rank}.json").write_text(json.dumps(record))
    sys.exit(code)


def _source_model(directory: Path, args: argparse.Namespace) -> int:
    """Write the random-weight Llama (bf16) with a tokenizer; return its bf16 bytes."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    tokenizer = Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters()) * 2


def _run(ranks: int, argv: list[str]) -> dict:
    """One command at ``ranks`` ranks: the largest peak over baseline of any rank."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", *argv]
    with tempfile.TemporaryDirectory() as where:
        env = {**os.environ, RECORDS: where}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        records = [json.loads(p.read_text()) for p in sorted(Path(where).glob("rank*.json"))]
    if proc.returncode != 0 or len(records) != ranks:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"{' '.join(argv[:1])} at {ranks} ranks failed:\n{tail}")
    over = [r["peak_mib"] - r["baseline_mib"] for r in records]
    return {
        "ranks": ranks,
        "baseline_mib": max(r["baseline_mib"] for r in records),
        "peak_mib": max(r["peak_mib"] for r in records),
        "over_baseline_mib": max(over),
        "helper_peak_mib": max(r["helper_peak_mib"] for r in records),
    }


def measure(args: argparse.Namespace) -> dict:
    results: dict = {"rows": []}
    with tempfile.TemporaryDirectory(prefix="hf_io_memory_") as tmp:
        tmp_path = Path(tmp)
        source = tmp_path / "llama"
        model_bytes = _source_model(source, args)
        results["model"] = {**vars(args), "json": None, "bf16_bytes": model_bytes}
        for ranks in args.ranks:
            run, cla, hf = (tmp_path / f"{name}{ranks}" for name in ("run", "cla", "hf"))
            commands = {
                "import-hf": ["import-hf", "--model", str(source), "--out", str(run)],
                "convert to-cla": [
                    "convert", "to-cla", "--checkpoint", str(run), "--out", str(cla),
                    "--cla-share-factor", "2",
                ],
                "export-hf": [
                    "export-hf", "--checkpoint", str(cla), "--out", str(hf), "--dtype", "bf16"
                ],
            }  # fmt: skip
            for name, argv in commands.items():
                row = {"command": name, **_run(ranks, argv)}
                row["per_model_bytes"] = row["over_baseline_mib"] * 2**20 / model_bytes
                results["rows"].append(row)
                print(
                    f"{name:15s} ranks {ranks}: peak {row['peak_mib']:7.0f} MiB, over baseline "
                    f"{row['over_baseline_mib']:7.0f} MiB = {row['per_model_bytes']:.2f} x the "
                    f"bf16 model ({model_bytes / 2**20:.0f} MiB); helper processes "
                    f"{row['helper_peak_mib']:.0f} MiB",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    args = _args(argv)
    results = measure(args)
    import torch

    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "command": "python benchmarks/hf_io_memory.py " + " ".join(argv),
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
