"""The ``--spec`` entry points under Megatron-LM's own training loop (``megatron.training``, as
``pretrain_gpt.py`` / ``pretrain_hybrid.py`` drive it, see ``tests/megatron_lm_driver.py``): a CLA
run trains, saves Megatron checkpoints and resumes from them bit for bit."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from megatron_cla.testing import run_on_ranks
from tests.helpers import prepared_corpus_sample
from tests.hybrid_helpers import requires_hybrid
from tests.megatron_lm_driver import pretrain_like_megatron_lm

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron.training") is None,
        reason="this megatron-core wheel does not ship megatron.training (0.19 does)",
    ),
]

TINY_MODEL = [
    "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "1", "--seq-length", "64", "--max-position-embeddings", "64",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--transformer-impl", "local",
    # No dropout: on a CPU the CPU harness serves "CUDA" random numbers from the CPU generator,
    # from which a resumed run's new data loader also draws, so dropout masks would shift after
    # a resume (on a GPU dropout has its own CUDA generator and resumes exactly).
    "--hidden-dropout", "0", "--attention-dropout", "0",
]  # fmt: skip
CPU = [
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
    "--no-rope-fusion", "--no-bias-swiglu-fusion", "--num-workers", "0",
]  # fmt: skip
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepared_corpus_sample(tmp_path_factory.mktemp("mlm_data"), 200, 512)


def _argv(data: Path, run: Path, spec: list[str], *extra: str) -> list[str]:
    return [
        *TINY_MODEL, *CPU, "--spec", *spec,
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(STEPS),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(data / "tokenizer.model"),
        "--train-data-path", str(data / "train"), "--valid-data-path", str(data / "valid"),
        "--data-cache-path", str(run / "cache"), "--eval-iters", "1", "--eval-interval", "100",
        "--log-interval", "1", "--save", str(run / "ckpt"), "--save-interval", "3",
        *extra,
    ]  # fmt: skip


def _run(script: str, argv: list[str]) -> dict[int, float]:
    return run_on_ranks(pretrain_like_megatron_lm, 1, script, argv, timeout=900)[0]


def _keys(checkpoint: Path) -> list[str]:
    from megatron.core import dist_checkpointing

    return list(dist_checkpointing.load_tensors_metadata(str(checkpoint)))


def _train_then_resume(script: str, data: Path, tmp: Path, spec: list[str], *extra: str):
    """Straight run of STEPS iterations, then a run resumed from the step-3 checkpoint."""
    straight = _run(script, _argv(data, tmp / "a", spec, *extra))
    assert sorted(straight) == list(range(1, STEPS + 1))
    shutil.copytree(tmp / "a", tmp / "b")
    shutil.rmtree(tmp / "b/ckpt/iter_0000006")
    (tmp / "b/ckpt/latest_checkpointed_iteration.txt").write_text("3")
    resumed = _run(script, _argv(data, tmp / "b", spec, *extra, "--load", str(tmp / "b/ckpt")))
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    return straight, _keys(tmp / "a/ckpt/iter_0000006")


def test_pretrain_gpt_module_spec_trains_saves_and_resumes(data_dir, tmp_path):
    losses, keys = _train_then_resume(
        "pretrain_gpt.py",
        data_dir,
        tmp_path,
        ["megatron_cla.pretrain_gpt_spec", "cla2_local"],
        "--num-layers", "4",
    )  # fmt: skip
    assert losses[STEPS] < losses[1]
    assert "decoder.layers.1.self_attention.linear_q.weight" in keys  # layers 2, 4 consume
    assert "decoder.layers.2.self_attention.linear_qkv.weight" in keys
    assert "decoder.layers.3.self_attention.linear_qkv.weight" not in keys


def test_pretrain_gpt_calls_a_callable_spec(data_dir, tmp_path):
    """Since 0.19 pretrain_gpt.py calls a callable --spec target with its GPTModelConfig."""
    losses = _run(
        "pretrain_gpt.py",
        _argv(data_dir, tmp_path, ["megatron_cla.pretrain_gpt_spec", "cla3_block_local"],
              "--num-layers", "6"),
    )  # fmt: skip
    assert losses[STEPS] < losses[1]
    keys = _keys(tmp_path / "ckpt/iter_0000006")
    consumers = sorted(
        int(k.split(".")[2])
        for k in keys
        if k.startswith("decoder.layers.") and k.endswith("linear_q.weight")
    )
    assert consumers == [1, 2, 4, 5]  # 0-based: layers 2, 3, 5, 6 read layers 1 and 4


@requires_hybrid
def test_pretrain_hybrid_module_spec_trains_saves_and_resumes(data_dir, tmp_path):
    losses, keys = _train_then_resume(
        "pretrain_hybrid.py",
        data_dir,
        tmp_path,
        ["megatron_cla.pretrain_hybrid_spec", "cla2_local"],
        "--hybrid-layer-pattern", "*-*-*-*-",
    )  # fmt: skip
    assert losses[STEPS] < losses[1]
    # attention layers 2 and 4 (pattern layers 3 and 7, 0-based 2 and 6) consume
    assert "decoder.layers.2.self_attention.linear_q.weight" in keys
    assert "decoder.layers.6.self_attention.linear_q.weight" in keys
    assert "decoder.layers.4.self_attention.linear_qkv.weight" in keys
