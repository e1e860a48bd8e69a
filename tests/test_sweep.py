"""The sweep and its report: a two-variant, few-step grid end to end (not the science), grid
validation, resumption, and the claim check."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_cla.experiments.report import VariantStats, check_claim, write_report
from megatron_cla.experiments.sweep import load_grid, plan_runs
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.seq_length=64",
    "train.train_iters=4",
    "train.warmup_iters=1",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "logging.log_interval=2",
    "logging.eval_interval=4",
    "logging.eval_iters=1",
    "logging.tensorboard=false",
    "checkpoint.save_interval=4",
]


def _grid(tmp_path: Path, data_dir: Path, **changes) -> Path:
    grid = {
        "name": "smoke",
        "base": str(ROOT / "configs" / "tiny_mqa.yaml"),
        "common": [*TINY, f"data.dir={data_dir}"],
        "seeds": [1, 2],
        "variants": {
            "H32-MQA": ["model.num_attention_heads=2", "model.head_dim=32"],
            "H32-MQA-CLA2": [
                "model.num_attention_heads=2",
                "model.head_dim=32",
                "model.cla_share_factor=2",
            ],
        },
        "claims": [{"better": "H32-MQA", "worse": "H32-MQA-CLA2", "paper": "13.54 < 13.60"}],
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepared_corpus_sample(tmp_path_factory.mktemp("sweep_data"), 200, 512)


def _module(name: str, *args: str) -> subprocess.CompletedProcess:
    return run_command(name, *args, timeout=900)


def test_sweep_and_report_end_to_end(data_dir, tmp_path):
    grid, out, docs = _grid(tmp_path, data_dir), tmp_path / "out", tmp_path / "docs"
    proc = _module("sweep", "--grid", str(grid), "--out", str(out), "--parallel", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line[:5] for line in proc.stdout.splitlines() if line.startswith("[")] == [
        "[1/4]",
        "[2/4]",
        "[3/4]",
        "[4/4]",
    ]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [  # grid order, whatever finished first
        ("H32-MQA", 1),
        ("H32-MQA", 2),
        ("H32-MQA-CLA2", 1),
        ("H32-MQA-CLA2", 2),
    ]
    assert len(rows) == 4 and (out / "results.csv").read_text().count("\n") == 5  # 2 x 2 seeds
    assert {r["kv_bytes_per_token"] for r in rows if r["variant"] == "H32-MQA"} == {256}
    assert {r["kv_bytes_per_token"] for r in rows if r["variant"] == "H32-MQA-CLA2"} == {128}
    assert {r["tokens"] for r in rows} == {4 * 4 * 64}
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("val_ppl", "tokens_per_s"))
    # Same data order and token budget, different seeds: the seeds really differ.
    first = [r["val_ppl"] for r in rows if r["variant"] == "H32-MQA"]
    assert first[0] != first[1]

    again = _module("sweep", "--grid", str(grid), "--out", str(out))
    assert again.returncode == 0 and again.stdout.count("done before") == 4  # resumable

    report = _module(
        "sweep-report",
        "--grid",
        str(grid),
        "--results",
        str(out),
        "--out",
        str(docs),
        "--command",
        "pytest",
        "--hardware",
        "CI",
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (docs / "report.md").read_text()
    assert "| H32-MQA-CLA2 | 128 |" in text
    assert "H32-MQA (" in text and "(paper: 13.54 < 13.60)" in text
    assert (docs / "pareto.png").read_bytes()[:4] == b"\x89PNG"


ONLY_A = {"lr_sweep": None, "claims": []}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({**ONLY_A, "variants": {"A": ["data.seed=3"]}}, r"variant A sets \['data.seed=3'\]"),
        ({**ONLY_A, "variants": {"A": ["train.train_iters=8"]}}, r"token budget, seed, lr and"),
        ({"lr_sweep": {"variants": ["B"], "lrs": [1e-3]}}, r"lr_sweep names unknown variant"),
        ({"claims": [{"better": "A", "worse": "Z"}]}, r"every claim needs `better` and `worse`"),
        ({"seeds": [1, 1]}, r"seeds must be distinct"),
        (
            {"lr_sweep": {"variants": ["H32-MQA"], "lrs": [1e-3], "seeds": [9]}},
            r"lr_sweep seeds \[9\] are not in seeds \[1, 2\]",
        ),
        ({"sedes": [1]}, r"unknown key\(s\) \['sedes'\]"),
    ],
)
def test_invalid_grids_are_rejected(data_dir, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_runs(load_grid(_grid(tmp_path, data_dir, **changes)), tmp_path / "out")


def test_claim_check_needs_separated_seed_ranges():
    a = VariantStats("A", 1e-3, 1, 1, [10.0, 10.2, 10.1], 1.0)
    b = VariantStats("B", 1e-3, 1, 1, [10.5, 10.7, 10.6], 1.0)
    c = VariantStats("C", 1e-3, 1, 1, [10.15, 10.6, 10.3], 1.0)
    assert check_claim(a, b) == (True, check_claim(a, b)[1])
    assert "held, beyond seed spread" in check_claim(a, b)[1]
    assert "did NOT hold, beyond seed spread" in check_claim(b, a)[1]
    held, verdict = check_claim(a, c)
    assert not held and "held, within seed spread (inconclusive)" in verdict


def test_lr_sweep_runs_and_table(data_dir, tmp_path):
    lr_sweep = {"variants": ["H32-MQA-CLA2"], "lrs": [1.0e-3, 4.0e-3]}
    grid = load_grid(_grid(tmp_path, data_dir, lr_sweep=lr_sweep))
    runs = plan_runs(grid, tmp_path / "out")
    assert [(r.variant, r.lr, r.main) for r in runs if r.seed == 1] == [
        ("H32-MQA", 2e-3, True),
        ("H32-MQA-CLA2", 2e-3, True),
        ("H32-MQA-CLA2", 1e-3, False),
        ("H32-MQA-CLA2", 4e-3, False),
    ]
    assert "train.min_lr=0.0001" in runs[4].overrides  # CLA2 at LR 1e-3, seed 1
    rows = [
        {
            "variant": r.variant,
            "lr": r.lr,
            "main": r.main,
            "seed": r.seed,
            "val_ppl": ppl,
            "kv_bytes_per_token": 1,
            "params": 1,
            "tokens": 1,
            "tokens_per_s": 1.0,
            "seconds": 1.0,
        }
        for r, ppl in zip(runs, [20, 21, 19, 20, 23, 22, 19.5, 20.5], strict=True)
    ]
    text = write_report(grid, rows, tmp_path / "docs").read_text()
    assert "| H32-MQA-CLA2 | 22.50 ± 0.71 | 19.50 ± 0.71 | 20.00 ± 0.71 | 0.002 |" in text
    assert "| H32-MQA |" not in text.split("Learning-rate sensitivity")[1]  # not swept


def test_lr_sweep_on_a_seed_subset_compares_matched_seeds(data_dir, tmp_path):
    lr_sweep = {"variants": ["H32-MQA-CLA2"], "lrs": [4.0e-3], "seeds": [2]}
    grid = load_grid(_grid(tmp_path, data_dir, lr_sweep=lr_sweep))
    runs = plan_runs(grid, tmp_path / "out")
    assert [(r.variant, r.lr, r.seed) for r in runs if not r.main] == [("H32-MQA-CLA2", 4e-3, 2)]
    ppls = {(r.variant, r.lr, r.seed): 20.0 + i for i, r in enumerate(runs)}
    rows = [
        {"variant": v, "lr": lr, "main": lr == 2e-3, "seed": seed, "val_ppl": ppl}
        | dict(kv_bytes_per_token=1, params=1, tokens=1, tokens_per_s=1.0, seconds=1.0)
        for (v, lr, seed), ppl in ppls.items()
    ]
    text = write_report(grid, rows, tmp_path / "docs").read_text()
    # Seed 2 only: CLA2 at 2e-3 is run 3 (ppl 23), at 4e-3 run 4 (ppl 24).
    assert "Seeds [2]" in text and "| H32-MQA-CLA2 | 23.00 ± 0.00 | 24.00 ± 0.00 | 0.002 |" in text


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")))
def test_shipped_grids_are_valid(path, tmp_path):
    runs = plan_runs(load_grid(path), tmp_path)
    assert len({(r.variant, r.lr, r.seed) for r in runs}) == len(runs) >= 6
