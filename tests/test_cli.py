"""Every command: errors are one line and exit status 1; output starts with what the user needs,
not Megatron's import-time notices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cla._compat import hybrid_model_available

ROOT = Path(__file__).resolve().parents[1]
# megatron-core 0.16.1 has no HybridModel: there the converter's first (one-line) error says so.
CONVERT_ERROR = (
    "convert: no complete checkpoint in no/run"
    if hybrid_model_available()
    else "convert: gpt-to-hybrid needs Megatron-Core's HybridModel"
)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["megatron_cla.pretrain", "--config", "no/such.yaml"], "invalid configuration: "),
        (["megatron_cla.kv_budget", "--config", "no/such.yaml"], "kv_budget: no such file"),
        (["megatron_cla.sweep", "--grid", "no/such.yaml"], "invalid sweep: no such file"),
        (["megatron_cla.generate", "--checkpoint", "no/run", "--prompt", "x"], "cannot serve"),
        (
            ["megatron_cla.convert", "gpt-to-hybrid", "--checkpoint", "no/run", "--out", "x"],
            CONVERT_ERROR,
        ),
        (
            ["megatron_cla.data.prepare", "--input", "no/such.jsonl", "--out", "x"],
            "prepare: no such file or directory: no/such.jsonl",
        ),
    ],
    ids=["pretrain", "kv_budget", "sweep", "generate", "convert", "prepare"],
)
def test_missing_inputs_are_one_line_errors(args, message):
    proc = _run(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]


def test_malformed_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    proc = _run("megatron_cla.pretrain", "--config", str(bad))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid configuration: while parsing")


def test_a_run_starts_with_its_header_not_library_notices(tmp_path):
    """Megatron's Apex/TE fallback notices, PyTorch's "No CUDA runtime", the cuda_graph_modules
    and GPTModel deprecation warnings are hidden; --verbose shows them."""
    from tests.helpers import prepared_corpus_sample
    from tests.pretrain_worker import tiny_overrides

    data = prepared_corpus_sample(tmp_path, 100, 512)
    overrides = tiny_overrides(tmp_path / "run", data, 2, "train.warmup_iters=1")
    quiet = _run("megatron_cla.pretrain", *overrides)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    output = (quiet.stderr + quiet.stdout).strip().splitlines()
    assert output[0].startswith("run: ") and "parameters | GPT, CLA groups" in output[0]
    assert not any("Warning" in line or "No CUDA runtime" in line for line in output), output
    # fails in the plan, after Megatron is imported: its notices are shown first
    verbose = _run("megatron_cla.pretrain", *overrides, "--verbose", "model.cla_share_factor=9")
    assert verbose.returncode == 1 and "invalid configuration: cla_share_factor=9" in verbose.stderr
    assert "Apex is not installed" in verbose.stderr or "Transformer Engine" in verbose.stderr
