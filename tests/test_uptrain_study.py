"""``megatron-cla uptrain-study`` end to end on a tiny plan: source, scratch, a conversion and two
uptraining methods (one distilled), the result rows, the report and its plot, and a re-run that
trains nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from megatron_cla.experiments.uptrain_study import load_plan
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample


def _plan(tmp_path: Path, data: Path) -> Path:
    plan = {
        "name": "tiny",
        "base": "configs/tiny_mqa.yaml",
        "common": [
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.num_attention_heads=2",
            "model.seq_length=32",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            f"data.dir={data}",
            "logging.eval_iters=1",
            "logging.tensorboard=false",
        ],
        "seeds": [1],
        "pretrain": ["train.train_iters=4", "train.warmup_iters=0", "logging.eval_interval=4"],
        "share_factor": 2,
        "kv_inits": ["mean"],
        "fractions": [0.25, 0.5],
        "uptrain": ["train.lr_decay_style=constant", "train.warmup_iters=0"],
        "methods": {
            "attention": ["uptrain.trainable=attention"],
            "distil": ["uptrain.teacher={source}", "uptrain.kd_weight=0.5"],
        },
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_a_tiny_study_runs_reports_and_resumes(tmp_path):
    data = prepared_corpus_sample(tmp_path, 60, 500)
    plan_file, out = _plan(tmp_path, data), tmp_path / "study"
    proc = run_command("uptrain-study", "--plan", plan_file, "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("uptrain-study tiny: 5 runs (1 seeds x (source, scratch, 1 ")
    rows = json.loads((out / "results.json").read_text())
    by_model = {(r["model"], r.get("method"), r.get("fraction")): r for r in rows}
    assert by_model[("source", None, None)]["steps"] == 4
    assert by_model[("scratch", None, None)]["steps"] == 6  # 4 pretraining + 2 uptraining
    for method in ("attention", "distil"):
        steps = [by_model[("uptrain", method, f)]["steps"] for f in (0.0, 0.25, 0.5)]
        assert steps == [0, 1, 2]
    before = {by_model[("uptrain", m, 0.0)]["val_ppl"] for m in ("attention", "distil")}
    assert len(before) == 1  # both start from the same conversion, evaluated before a step
    report = (out / "report" / "report.md").read_text()
    assert "| mean | distil |" in report and "## Comparisons" in report
    assert (out / "report" / "uptraining.png").stat().st_size > 10_000
    again = run_command("uptrain-study", "--plan", plan_file, "--out", out, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before") == 5, again.stdout


@pytest.mark.version_independent
def test_bad_plans_are_refused(tmp_path):
    path = _plan(tmp_path, tmp_path / "data")
    plan = yaml.safe_load(path.read_text())
    for change, words in [
        ({"kv_inits": ["median"]}, "kv_inits are mean and/or first"),
        ({"fractions": [0.1, 0.12]}, "give the same step counts"),
        ({"share_factor": 1}, "share_factor must be >= 2"),
        ({"extra": 1}, "unknown key(s) ['extra']"),
    ]:
        path.write_text(yaml.safe_dump({**plan, **change}))
        with pytest.raises(ValueError, match=re.escape(words)):
            load_plan(path)
