"""Test setup: CPU/gloo harness where no GPU exists; one in-process rank for single-rank tests."""

import gc
import os

import psutil
import pytest
import torch
import torch.distributed as dist

from megatron_cla.runtime.distributed import live_process_groups
from megatron_cla.testing import enable_megatron_on_cpu, init_process_group_once, model_parallel

if not torch.cuda.is_available():
    enable_megatron_on_cpu()
else:  # bitwise comparisons need deterministic kernels (embedding backward, cuBLAS)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on machines without a GPU")
    config.addinivalue_line("markers", "distributed: spawns several ranks")
    config.addinivalue_line(
        "markers",
        "version_independent: touches no megatron-core code, so CI runs it once (on the newest "
        "megatron-core) and its megatron-core 0.16.1 run deselects it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pp2_gpt_run(tmp_path_factory):
    """A tiny CLA2 launcher run trained for 16 steps on 2 pipeline stages (checkpoint at PP 2),
    shared by the tests that serve and convert launcher checkpoints."""
    from megatron_cla.testing import run_on_ranks
    from tests.helpers import prepared_corpus_sample
    from tests.pretrain_worker import pretrain_on_rank, tiny_overrides

    root = tmp_path_factory.mktemp("pp2_gpt_run")
    prepared_corpus_sample(root, 300, 512)
    overrides = tiny_overrides(root / "run", root / "data", 16, "parallel.pipeline=2")
    run_on_ranks(pretrain_on_rank, 2, overrides, timeout=600)
    return root / "run"


@pytest.fixture
def single_rank():
    """A one-rank world with TP=PP=1 Megatron parallel state, torn down after the test."""
    init_process_group_once()
    with model_parallel():
        yield


THREADS_BEFORE_COLLECTING = 64
"""Threads of the test process above which a finished test's garbage is collected at once."""


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """Fail a test after which process groups other than the world stay registered in the test
    process, and free the destroyed ones' threads.

    Megatron forgets its groups without destroying them, and each gloo group keeps threads
    polling its sockets until the group object is freed. Models hold their groups in reference
    cycles, which only Python's cyclic garbage collector frees, and rarely: a few hundred
    groups' threads piled up over the suite made a whole CI run three times slower. So the
    groups are destroyed here if a test left them, and the garbage is collected whenever the
    process holds more threads than a test needs."""
    yield
    leaked = live_process_groups()
    for group in leaked:
        dist.destroy_process_group(group)
    if psutil.Process().num_threads() > THREADS_BEFORE_COLLECTING:
        gc.collect()
    if leaked:
        pytest.fail(
            f"{len(leaked)} process group(s) left alive by this test (or the library code it "
            "ran): set Megatron's parallel state up with "
            "megatron_cla.runtime.megatron_parallel_state, which destroys them"
        )
