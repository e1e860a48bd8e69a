"""Uptraining a converted model with the launcher: distillation from the source model
(``uptrain.teacher``), attention-only training (``uptrain.trainable``), and the inputs refused.

A student equal to its teacher has zero KL and the teacher's cross-entropy; a converted CLA2
student sees the same teacher cross-entropy on the same batches, a positive KL, and the same
numbers at tensor parallelism 2; attention-only runs leave every other tensor bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_cla.conversion.to_cla import CLATarget, convert_run_to_cla
from megatron_cla.testing import run_on_ranks
from megatron_cla.testing.distributed import init_process_group_once
from megatron_cla.training.run_dir import copy_run
from megatron_cla.training.uptraining import is_attention_parameter
from tests.commands import run_command
from tests.helpers import prepared_corpus_sample
from tests.hf_helpers import run_weights, variant_config, write_random_checkpoint
from tests.pretrain_worker import pretrain_file_on_rank

VOCAB = 512
STUDENT = [
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup_iters=0",
    "logging.log_interval=1",
    "logging.eval_interval=0",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A random-weight MQA source (S = 1), its CLA2 conversion (mean K/V) and their data."""
    init_process_group_once()
    root = tmp_path_factory.mktemp("uptrain")
    data = prepared_corpus_sample(root, 120, VOCAB)
    source = root / "source"
    cfg = variant_config(source, data, "model.num_layers=4")
    write_random_checkpoint(cfg, VOCAB)
    convert_run_to_cla(source, root / "cla2", CLATarget(2))
    convert_run_to_cla(source, root / "twin", CLATarget(1))  # S = 1: the source's own weights
    return {
        "root": root,
        "data": data,
        "source": source,
        "cla2": root / "cla2",
        "twin": root / "twin",
    }


def _uptrain(student: Path, steps: int, *extra: str, world: int = 1) -> list[dict]:
    """Train ``student`` (a run directory) on for ``steps`` steps; its metrics rows."""
    overrides = [*STUDENT, f"train.train_iters={steps}", *extra]
    run_on_ranks(pretrain_file_on_rank, world, str(student / "config.yaml"), overrides, timeout=600)
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_distillation_logs_its_parts_and_a_student_equal_to_its_teacher_has_no_kl(runs, tmp_path):
    teacher = f"uptrain.teacher={runs['source']}"
    twin = _uptrain(copy_run(runs["twin"], tmp_path / "twin"), 1, teacher)[0]
    assert twin["kl"] == pytest.approx(0.0, abs=1e-5)
    assert twin["ce"] == pytest.approx(twin["teacher_ce"], rel=1e-6)
    assert twin["loss"] == pytest.approx(0.5 * twin["ce"], rel=1e-5)  # kd_weight 0.5

    student = copy_run(runs["cla2"], tmp_path / "student")
    rows = _uptrain(student, 2, teacher, "uptrain.kd_weight=0.25", "uptrain.kd_temperature=3")
    first = rows[0]
    assert first["teacher_ce"] == pytest.approx(twin["teacher_ce"], rel=1e-6)  # same batch
    assert first["kl"] > 1e-3
    want = 0.75 * first["ce"] + 0.25 * 9 * first["kl"]
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    log = (student / "metrics.jsonl").read_text()
    assert [row["step"] for row in rows] == [1, 2] and "NaN" not in log


def test_tensor_parallel_distillation_equals_one_rank(runs, tmp_path):
    teacher = f"uptrain.teacher={runs['source']}"
    one = _uptrain(copy_run(runs["cla2"], tmp_path / "tp1"), 1, teacher)[0]
    two = _uptrain(
        copy_run(runs["cla2"], tmp_path / "tp2"), 1, teacher, "parallel.tensor=2", world=2
    )[0]
    for key in ("loss", "ce", "kl", "teacher_ce"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def test_attention_only_training_changes_nothing_else(runs, tmp_path):
    student = copy_run(runs["cla2"], tmp_path / "attention")
    before, _ = run_weights(student)
    _uptrain(student, 2, "uptrain.trainable=attention")
    after, _ = run_weights(student)
    attention = {name for name in before if is_attention_parameter(name)}
    assert attention and len(attention) < len(before)
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != (name in attention), f"{name}: changed={not same}"


def _refused(student: Path, *overrides: str) -> str:
    proc = run_command("pretrain", "--config", student / "config.yaml", *STUDENT, *overrides)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert not (student / "metrics.jsonl").exists()
    return lines[0]


def test_bad_teachers_and_settings_are_one_line_before_anything_is_built(runs, tmp_path):
    root, data = runs["root"], runs["data"]
    other_vocab = tmp_path / "other_vocab"
    write_random_checkpoint(variant_config(other_vocab, data, "model.num_layers=4"), 640)
    wider = tmp_path / "wider"
    write_random_checkpoint(
        variant_config(wider, data, "model.num_layers=4", "model.hidden_size=96"), VOCAB
    )
    (tmp_path / "other_tokenizer").mkdir()
    other_data = prepared_corpus_sample(tmp_path / "other_tokenizer", 90, VOCAB)
    other_tokenizer = tmp_path / "other_tok_run"
    write_random_checkpoint(
        variant_config(other_tokenizer, other_data, "model.num_layers=4"), VOCAB
    )
    student = copy_run(runs["cla2"], tmp_path / "student")
    cases = {
        other_vocab: "vocabulary rows",
        wider: "hidden_size 96 vs 64",
        other_tokenizer: "is another one than the student's",
        root / "missing": "does not exist",
    }
    for teacher, words in cases.items():
        line = _refused(student, f"uptrain.teacher={teacher}")
        assert line.startswith("pretrain: uptrain.teacher") and words in line, line
    line = _refused(student, f"uptrain.teacher={runs['source']}", "parallel.pipeline=2")
    assert "needs parallel.pipeline=1" in line, line


@pytest.mark.parametrize(
    "overrides, words",
    [
        (("uptrain.trainable=attn",), "use one of ['all', 'attention']"),
        (("uptrain.kd_weight=1.5",), "must be in [0, 1]"),
        (("uptrain.kd_temperature=0",), "must be > 0"),
        (
            ("uptrain.teacher=somewhere", "parallel.pipeline=2", "parallel.virtual_pipeline=2"),
            "needs parallel.pipeline=1",
        ),
        (
            ("model.arch=hybrid", "model.hybrid_layer_pattern=M-M-", "uptrain.trainable=attention"),
            "has no attention layer",
        ),
        (
            (
                "model.arch=hybrid",
                "model.hybrid_layer_pattern=*-|M-",
                "uptrain.trainable=attention",
            ),
            "pipeline segment(s) [1]",
        ),
    ],
)
def test_invalid_uptrain_settings_are_refused_by_the_plan(overrides, words):
    from megatron_cla.training.config import load_config
    from megatron_cla.training.plan import make_plan

    with pytest.raises(ValueError, match=re.escape(words)):
        make_plan(load_config(None, list(overrides)), 4, on_gpu=False)
