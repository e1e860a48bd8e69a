"""The public test harness: CPU patches and spawned ranks that never outlive a failure."""

import psutil
import pytest
import torch

from megatron_cla.testing import RankFailure, is_megatron_on_cpu_enabled, run_on_ranks
from tests import harness_worker


def _children() -> list:
    """Live child processes, except multiprocessing's long-lived resource tracker."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and not any(
                "resource_tracker" in part for part in child.cmdline()
            ):
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


def test_ranks_communicate():
    assert run_on_ranks(harness_worker.all_reduce_rank, 2) == [3.0, 3.0]


def test_failing_rank_raises_with_traceback_and_kills_the_rest():
    with pytest.raises(RankFailure, match="(?s)rank 1 of 2 failed.*rank one is broken on purpose"):
        run_on_ranks(harness_worker.fail_on_rank_one, 2, timeout=120)
    assert _children() == []


def test_hanging_rank_times_out_and_is_killed():
    with pytest.raises(RankFailure, match="did not finish within 3 s"):
        run_on_ranks(harness_worker.hang, 2, timeout=3)
    assert _children() == []


def test_helpers_started_by_ranks_do_not_outlive_them():
    pids = run_on_ranks(harness_worker.start_helper_process, 2)
    gone, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10
    )
    assert not alive, f"helper processes left behind: {alive}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are for GPU-less machines")
def test_cpu_patches_redirect_cuda_requests():
    assert is_megatron_on_cpu_enabled()
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"


def test_model_parallel_blocks_do_not_pile_up_process_groups():
    """Megatron never destroys its groups; ``model_parallel`` does (each gloo group has threads)."""
    from megatron_cla.testing import init_process_group_once, model_parallel

    init_process_group_once()
    with model_parallel():
        pass
    threads = psutil.Process().num_threads()
    for _ in range(10):
        with model_parallel():
            pass
    assert psutil.Process().num_threads() <= threads + 2
