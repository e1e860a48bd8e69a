"""The pretraining launcher: config validation, training, exact resume, resharded resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_cla._compat import hybrid_model_available
from megatron_cla.testing import run_on_ranks
from megatron_cla.training import plan as plan_module
from megatron_cla.training.batches import context_parallel_shard
from megatron_cla.training.checkpoint import Checkpointer, CorruptCheckpoint
from megatron_cla.training.config import load_config
from megatron_cla.training.model import resumed_vocab_size
from megatron_cla.training.plan import make_plan
from tests.commands import start_command
from tests.helpers import prepared_corpus_sample
from tests.hybrid_helpers import requires_hybrid
from tests.pretrain_worker import HYBRID_RUN, pretrain_on_rank, step_losses, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared dataset (400 documents of the embedded corpus, vocab 512)."""
    return prepared_corpus_sample(tmp_path_factory.mktemp("pretrain_data"), 400, 512)


@pytest.fixture(scope="module")
def odd_vocab_data_dir(tmp_path_factory) -> Path:
    """Like ``data_dir`` with 600 tokens: Megatron pads that to 640 at TP1 but 768 at TP2."""
    return prepared_corpus_sample(tmp_path_factory.mktemp("pretrain_data_600"), 400, 600)


def _launch(overrides: list[str], **kwargs) -> subprocess.Popen:
    return start_command("pretrain", *overrides, **kwargs)


def _run(overrides: list[str], timeout: float = 300) -> str:
    proc = _launch(overrides)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path, monkeypatch):
    cfg = load_config(path)
    if cfg.model.arch == "hybrid" and not hybrid_model_available():
        pytest.skip("HybridModel does not exist in this megatron-core (it needs 0.19 or newer)")
    p = cfg.parallel
    on_gpu = cfg.train.precision != "fp32"
    if on_gpu:  # GPU configs: validate them as the GPU machine (with TE) would
        monkeypatch.setattr(plan_module, "transformer_engine_available", lambda: True)
    make_plan(cfg, world_size=p.tensor * p.pipeline * p.context, on_gpu=on_gpu)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["train.lrr=1"], 1, r"unknown key\(s\) \['train.lrr'\]"),
        (["modle.num_layers=2"], 1, r"unknown key\(s\) \['modle'\]"),
        (["train.train_iters=ten"], 1, r"train.train_iters must be int, got 'ten'"),
        (
            ["train.train_iters=300", "train.warmup_iters=300"],
            1,
            r"warmup_iters=300 must be in \[0, train_iters=300\)",
        ),
        (["parallel.tensor=2"], 3, r"world size 3 is not divisible by tensor x pipeline"),
        (["train.global_batch_size=12"], 2, r"global_batch_size=12 must be a multiple of"),
        (["parallel.tensor=3"], 3, r"num_attention_heads=4 must be divisible by parallel"),
        (["parallel.sequence_parallel=true"], 1, r"sequence_parallel needs parallel.tensor > 1"),
        (["parallel.context=2"], 2, r"context > 1 needs Transformer Engine"),
        (["train.precision=bf16"], 1, r"precision='bf16' on a CPU: use fp32"),
        (["train.fp8=delayed"], 1, r"train.fp8='delayed' needs Transformer Engine on a GPU"),
        (["train.fp8=fp4"], 1, r"train.fp8='fp4': use one of \['blockwise', 'delayed', 'mxf"),
        (["train.fp8=delayed", "train.fp8_format=e5m2"], 1, r"fp8_format='e5m2': use hybrid"),
        (
            ["model.cla_share_factor=2", "model.num_layers=6", "parallel.pipeline=2"],
            2,
            r"Pipeline stage 1 would start at layer 4",
        ),
        (["model.cla_share_factor=0"], 1, r"cla_share_factor must be >= 1"),
        (["model.num_query_groups=3"], 1, r"must be a multiple of num_query_groups=3"),
    ],
)
def test_invalid_run_configs_fail_before_allocation(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        make_plan(load_config(ROOT / "configs/tiny_mqa.yaml", overrides), world, on_gpu=False)


H = list(HYBRID_RUN)  # tiny_mqa_cla2.yaml spelled '*-*-*-*-'


@requires_hybrid
@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["model.arch=mamba"], 1, r"model.arch='mamba': use gpt or hybrid"),
        (["model.arch=hybrid"], 1, r"model.arch=hybrid needs model.hybrid_layer_pattern"),
        (["model.hybrid_layer_pattern=*-*-"], 1, r"hybrid_layer_pattern and model.num_experts"),
        ([*H, "model.num_layers=6"], 1, r"model.num_layers=6 but model.hybrid_layer_pattern has 8"),
        ([*H, "model.hybrid_layer_pattern=*M*-"], 1, r"\['M'\] layers: Mamba-2 / Gated DeltaNet"),
        ([*H, "model.hybrid_layer_pattern=*E*-"], 1, r"model.num_experts=None with E layers"),
        ([*H, "model.num_experts=4"], 1, r"model.num_experts=4 with no E layers"),
        ([*H, "model.hybrid_layer_pattern=M-M-"], 1, r"has no attention layer"),
        (
            [*H, "parallel.pipeline=2"],
            2,
            r"needs 2 '\|'-separated segments.*model.hybrid_layer_pattern='\*-\*-\|\*-\*-'",
        ),
        (
            [*H, "parallel.pipeline=2", "model.hybrid_layer_pattern=*-*-*-|*-"],
            2,
            r"segment 1 .* starts with attention layer 4",
        ),
        (
            [*H, "parallel.pipeline=2", "parallel.pipeline_layout=Et|tL"],
            2,
            r"parallel.pipeline_layout is GPT-only",
        ),
        ([*H, "model.cla_share_factor=5"], 1, r"cla_share_factor=5 exceeds the 4 attention layers"),
    ],
)
def test_invalid_hybrid_run_configs_fail_before_allocation(overrides, world, message):
    cfg = load_config(ROOT / "configs/tiny_mqa_cla2.yaml", overrides)
    with pytest.raises(ValueError, match=message):
        make_plan(cfg, world, on_gpu=False)


@pytest.mark.parametrize(
    "overrides,supported,message",
    [
        (["train.precision=fp32"], True, r"FP8 runs on top of bf16; set train.precision=bf16"),
        (["model.seq_length=100", "train.micro_batch_size=1"], True, r"multiples of 16.*= 100"),
        (["model.hidden_size=264", "model.num_attention_heads=4"], True, r"hidden_size = 264"),
        ([], False, r"train.fp8='mxfp8' is not supported here \(needs compute capability 10"),
    ],
)
def test_fp8_settings_are_checked_before_allocation(monkeypatch, overrides, supported, message):
    """What only a TE + GPU machine can reach, with TE's hardware query answered for it."""
    monkeypatch.setattr(plan_module, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(
        plan_module,
        "fp8_recipe_support",
        lambda recipe: (supported, "" if supported else "needs compute capability 10.0+"),
    )
    cfg = load_config(
        ROOT / "configs/tiny_mqa.yaml",
        ["train.fp8=mxfp8", "train.transformer_engine=on", *overrides],
    )
    with pytest.raises(ValueError, match=message):
        make_plan(cfg, 1, on_gpu=True)


def test_context_parallel_shard_is_load_balanced():
    batch = {"tokens": torch.arange(16).view(1, 16), "loss_mask": torch.ones(1, 16)}
    shards = [context_parallel_shard(batch, rank, 2)["tokens"].tolist() for rank in (0, 1)]
    assert shards == [[[0, 1, 2, 3, 12, 13, 14, 15]], [[4, 5, 6, 7, 8, 9, 10, 11]]]
    assert context_parallel_shard(batch, 0, 1) is batch
    with pytest.raises(ValueError, match=r"sequence length \(16\) to be a multiple of 2 x 3"):
        context_parallel_shard(batch, 0, 3)


def test_distributed_optimizer_needs_te_or_apex():
    from megatron.core.models.backends import HAVE_APEX

    cfg = load_config(
        ROOT / "configs/tiny_mqa.yaml",
        ["parallel.distributed_optimizer=true", "train.micro_batch_size=4"],
    )
    if HAVE_APEX:  # Megatron's fused Adam path reloads its checkpoints
        make_plan(cfg, 2, on_gpu=False)
        return
    with pytest.raises(ValueError, match="distributed_optimizer needs TE or NVIDIA Apex"):
        make_plan(cfg, 2, on_gpu=False)


def test_cli_reports_invalid_configuration():
    proc = _launch(["--config", "configs/tiny_mqa.yaml", "train.lrr=1"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "invalid configuration: unknown key(s) ['train.lrr']" in out


# ---------------------------------------------------------------- training


@pytest.mark.distributed
def test_two_rank_pipeline_training_reduces_loss(data_dir, tmp_path):
    """2 ranks (PP2, CLA2) train the tiny model: loss falls, validation ppl and checkpoint exist.
    (A PP2 hybrid run through the launcher: tests/test_generate.py's trained_hybrid_run.)"""
    overrides = tiny_overrides(tmp_path / "run", data_dir, 24, "parallel.pipeline=2")
    val_ppl = run_on_ranks(pretrain_on_rank, 2, overrides, timeout=600)
    losses = step_losses(tmp_path / "run")
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, (first, last)
    assert val_ppl[0] is not None and val_ppl[0] < 512  # better than a uniform guess
    assert Checkpointer(tmp_path / "run/checkpoints").complete_iterations() == [24]


@pytest.mark.distributed
def test_data_parallel_follows_the_one_rank_loss_curve(data_dir, tmp_path):
    """Same global batch, same curve: gradients are reduced over the data-parallel ranks."""
    one = tiny_overrides(tmp_path / "one", data_dir, 8, "logging.log_interval=1")
    two = tiny_overrides(tmp_path / "two", data_dir, 8, "logging.log_interval=1")
    run_on_ranks(pretrain_on_rank, 1, one, timeout=600)
    run_on_ranks(pretrain_on_rank, 2, two, timeout=600)  # DP 2
    expected, got = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-4, (expected, got)


@pytest.mark.parametrize(
    "arch", ["gpt", pytest.param("hybrid", marks=requires_hybrid)], ids=["GPT", "hybrid"]
)
def test_killed_run_resumes_bit_identically(data_dir, tmp_path, arch):
    steps = 16
    extra = ("checkpoint.save_interval=4", *(HYBRID_RUN if arch == "hybrid" else ()))
    _run(tiny_overrides(tmp_path / "straight", data_dir, steps, *extra))
    reference = step_losses(tmp_path / "straight")

    killed = tmp_path / "killed"
    proc = _launch(tiny_overrides(killed, data_dir, steps, *extra), start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and max(step_losses(killed), default=0) >= 10:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to save or clean up
    proc.wait()
    resumed_from = max(Checkpointer(killed / "checkpoints").complete_iterations())
    assert 4 <= resumed_from < steps
    out = _run(tiny_overrides(killed, data_dir, steps, *extra))
    assert f"resumed from step {resumed_from}" in out
    losses = step_losses(killed)
    assert [losses[s] for s in range(1, steps + 1)] == [reference[s] for s in range(1, steps + 1)]


@pytest.mark.distributed
@pytest.mark.distributed
@pytest.mark.parametrize(
    "saved,resumed",
    [((1, []), (2, ["parallel.tensor=2"])), ((2, ["parallel.pipeline=2"]), (1, []))],
    ids=["TP1-to-TP2", "PP2-to-PP1"],
)
def test_resume_at_another_parallel_layout(request, tmp_path, saved, resumed):
    """The curve continues after resharding. TP1 -> TP2 keeps the vocabulary padding the run was
    saved with (640 rows, not TP2's 768); PP2 -> PP1 also proves that the tied embedding and
    output weights stayed one weight on two stages (PP1 has a single copy of it)."""
    data_dir = request.getfixturevalue("odd_vocab_data_dir" if resumed[0] == 2 else "data_dir")
    extra = ("checkpoint.save_interval=6", "model.num_query_groups=2")
    run_on_ranks(
        pretrain_on_rank,
        saved[0],
        tiny_overrides(tmp_path / "a", data_dir, 12, *extra, *saved[1]),
        timeout=600,
    )
    reference = step_losses(tmp_path / "a")
    resharded = tmp_path / "b"
    shutil.copytree(tmp_path / "a", resharded)
    shutil.rmtree(resharded / "checkpoints" / "iter_0000012")
    (resharded / "metrics.jsonl").unlink()
    overrides = tiny_overrides(
        resharded, data_dir, 12, *extra, *resumed[1], "checkpoint.load_iteration=6"
    )
    run_on_ranks(pretrain_on_rank, resumed[0], overrides, timeout=600)
    losses = step_losses(resharded)
    assert sorted(losses) == list(range(7, 13))
    for step in range(7, 13):  # another TP/PP sums in another order: fp32 rounding only
        assert losses[step] == pytest.approx(reference[step], rel=1e-4)


def test_resumed_vocab_size_must_split_over_tensor_parallel():
    assert resumed_vocab_size(640, 2) == 640
    with pytest.raises(ValueError, match=r"\(640 rows\) cannot be split over TP 3; use a TP in"):
        resumed_vocab_size(640, 3)


def test_partial_and_corrupt_checkpoints_are_reported(data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    _run(tiny_overrides(run, data_dir, 8, "checkpoint.save_interval=4"))
    ckpt = Checkpointer(run / "checkpoints")
    (run / "checkpoints" / "iter_0000012.partial").mkdir()  # a save that was killed
    (run / "checkpoints" / "iter_0000016").mkdir()  # no completion marker
    assert ckpt.complete_iterations() == [4, 8]
    assert "iter_0000012.partial: the save did not finish" in caplog.text
    victim = next(p for p in (run / "checkpoints/iter_0000008").rglob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"corrupted!")
    with pytest.raises(CorruptCheckpoint, match="checkpoint.load_iteration=4"):
        ckpt.verify(8)
    ckpt.verify(4)  # the previous checkpoint is untouched
    out = _run(tiny_overrides(run, data_dir, 10, "checkpoint.load_iteration=4"))
    assert "resumed from step 4" in out


@pytest.mark.distributed
def test_two_nodes_on_loopback_meet_at_one_rendezvous(data_dir, tmp_path):
    """launch/torchrun.sh on two 'nodes' (two torchrun agents, 1 process each) on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "PYTHON": sys.executable,
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "RDZV_ID": f"test-{port}",
    }
    overrides = tiny_overrides(tmp_path / "run", data_dir, 8)
    cmd = [
        "bash",
        str(ROOT / "launch/torchrun.sh"),
        str(ROOT / "configs/tiny_mqa_cla2.yaml"),
        *overrides,
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    log = "".join(outputs)
    assert "world 2 = TP 1 x PP 1 x CP 1 x DP 2" in log
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, 9))
