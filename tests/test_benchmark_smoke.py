"""The benchmark script runs end to end (tiny sizes) and reports its ratios."""

import json
import subprocess
import sys
from pathlib import Path

from tests.hybrid_helpers import requires_hybrid

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "cla_step_time.py"),
        "--hidden",
        "64",
        "--layers",
        "4",
        "--heads",
        "4",
        "--seq",
        "32",
        "--batch",
        "2",
        "--vocab",
        "128",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLA2/S=1 step time" in proc.stdout and "S=1/stock step time" in proc.stdout
    result = json.loads(out.read_text())
    assert result["ratios"]["CLA2/S=1 KV bytes/token"] == 0.5
    assert result["rows"]["S=1"]["params"] == result["rows"]["stock"]["params"]
    assert result["rows"]["CLA2"]["params"] < result["rows"]["S=1"]["params"]


def test_inference_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    args = "--layers 4 --hidden 64 --heads 4 --vocab 128 --prompt 16 --new-tokens 8 --batch 4"
    args += " --repeats 1 --buffer-mb 0.5 --block 32"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cla_inference.py"), *args.split()]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = json.loads(out.read_text())["ratios"]
    assert ratios["static cache bytes"] == ratios["paged block bytes"] == 0.5
    assert ratios["peak concurrent requests"] >= 2.0
    assert ratios["decode tokens/s"] > 0


@requires_hybrid
def test_hybrid_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    args = "--hidden 64 --layers 4 --heads 4 --seq 32 --batch 2 --vocab 128 --steps 3 --warmup 1"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hybrid_step_time.py"), *args.split()]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")  # no library notices first
    ratios = json.loads(out.read_text())["ratios"]
    assert ratios["hybrid CLA2 / hybrid S=1 KV bytes/token (measured)"] == 0.5
    assert ratios["hybrid CLA2 / GPT CLA2 KV bytes/token (measured)"] == 1.0
    assert ratios["hybrid CLA2 / GPT CLA2 params"] == 1.0
