"""The ``megatron-cla`` command: every subcommand is listed and has its own help; errors are one
line and exit status 1; output starts with what the user needs, not Megatron's import-time
notices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cla._compat import hybrid_model_available
from megatron_cla.cli.common import COMMANDS
from tests.commands import ROOT, command_env, run_command, start_command

# megatron-core 0.16.1 has no HybridModel: there the converter's first (one-line) error says so.
CONVERT_ERROR = (
    "convert: no complete checkpoint in no/run"
    if hybrid_model_available()
    else "convert: gpt-to-hybrid needs Megatron-Core's HybridModel"
)
NAMES = [c.name for c in COMMANDS]


def _console_script(*args: str) -> subprocess.CompletedProcess:
    """The installed ``megatron-cla`` entry point (next to this interpreter)."""
    script = Path(sys.executable).with_name("megatron-cla")
    assert script.is_file(), f"{script} missing: pip install -e . installs the console script"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, cwd=ROOT, env=command_env()
    )


@pytest.mark.version_independent
def test_help_lists_every_command_with_one_line():
    proc = _console_script("--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "usage: megatron-cla <command> [options]"
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line.split()]
    assert listed[: len(NAMES)] == NAMES
    for command in COMMANDS:
        assert f"  {command.name}" in proc.stdout and command.summary in proc.stdout
    assert run_command("--help").stdout == proc.stdout  # python -m megatron_cla: the same


@pytest.mark.version_independent
@pytest.mark.parametrize("name", NAMES)
def test_every_command_has_its_own_help(name):
    proc = _console_script(name, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: megatron-cla {name} ")
    summary = next(c.summary for c in COMMANDS if c.name == name)
    assert summary[1:] in proc.stdout and "Warning" not in proc.stdout + proc.stderr


@pytest.mark.version_independent
@pytest.mark.parametrize(
    "args,message",
    [
        ([], "megatron-cla: give a command first: pretrain, generate,"),
        (["--config", "x.yaml"], "megatron-cla: give a command first: pretrain, generate,"),
        (["train"], "megatron-cla: unknown command 'train'; choose from pretrain, generate,"),
    ],
    ids=["no command", "option first", "unknown command"],
)
def test_a_missing_or_unknown_command_is_one_line(args, message):
    proc = _console_script(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--config", "no/such.yaml"], "invalid configuration: "),
        (["kv-budget", "--config", "no/such.yaml"], "kv-budget: no such file"),
        (["sweep", "--grid", "no/such.yaml"], "invalid sweep: no such file"),
        (["generate", "--checkpoint", "no/run", "--prompt", "x"], "cannot serve"),
        (["convert", "gpt-to-hybrid", "--checkpoint", "no/run", "--out", "x"], CONVERT_ERROR),
        (
            ["prepare-data", "--input", "no/such.jsonl", "--out", "x"],
            "prepare-data: no such file or directory: no/such.jsonl",
        ),
        (
            ["sweep-report", "--grid", "no/such.yaml", "--results", "no/dir", "--out", "x"],
            "sweep-report: no such file or directory: no/dir/results.json",
        ),
    ],
    ids=["pretrain", "kv-budget", "sweep", "generate", "convert", "prepare-data", "sweep-report"],
)
def test_missing_inputs_are_one_line_errors(args, message):
    proc = run_command(*args, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]


def test_malformed_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    proc = run_command("pretrain", "--config", bad, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid configuration: while parsing")


def test_a_run_starts_with_its_header_not_library_notices(tmp_path, monkeypatch):
    """Megatron's Apex/TE fallback notices, PyTorch's "No CUDA runtime", the cuda_graph_modules
    and GPTModel deprecation warnings are hidden; --verbose shows them, whatever warning filters
    the caller's environment sets."""
    from tests.helpers import prepared_corpus_sample
    from tests.pretrain_worker import tiny_overrides

    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    data = prepared_corpus_sample(tmp_path, 100, 512)
    overrides = tiny_overrides(tmp_path / "run", data, 2, "train.warmup_iters=1")
    quiet = run_command("pretrain", *overrides, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    output = (quiet.stderr + quiet.stdout).strip().splitlines()
    assert output[0].startswith("run: ") and "parameters | GPT, CLA groups" in output[0]
    assert not any("Warning" in line or "No CUDA runtime" in line for line in output), output
    # fails in the plan, after Megatron is imported: its notices are shown first
    verbose = run_command(
        "pretrain", *overrides, "--verbose", "model.cla_share_factor=9", timeout=300
    )
    assert verbose.returncode == 1 and "invalid configuration: cla_share_factor=9" in verbose.stderr
    assert "Apex is not installed" in verbose.stderr or "Transformer Engine" in verbose.stderr


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """``megatron-cla kv-budget ... | head -1``: the command stops quietly when its reader goes."""
    args = ["kv-budget", "--config", "configs/paper_1b_h128_mqa_cla2.yaml"]
    proc = start_command(*args, "--plot", tmp_path / "budget.png", stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and first.startswith("GPU memory")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
