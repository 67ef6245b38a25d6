"""bnlab.launch.run_local_ranks: results in rank order, and failures or hangs reported, never waited on forever."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from bnlab.launch import LocalRanksError, run_local_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the ranks import sync_workers too
import sync_workers  # noqa: E402


def test_results_come_back_in_rank_order_from_one_process_group():
    tensor = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    results = run_local_ranks(sync_workers.report_rank, 3, (tensor,), timeout_s=120, collective_timeout_s=30)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world_size"] == 3 for r in results)
    for r in results:  # all_reduce of rank·tensor over ranks 0, 1, 2 = 3·tensor: the ranks really talked
        assert torch.equal(r["sum"], 3 * tensor)


def test_a_failing_rank_is_reported_and_the_waiting_rank_is_stopped():
    with pytest.raises(LocalRanksError) as info:
        run_local_ranks(sync_workers.fail_on_rank_one, 2, timeout_s=120, collective_timeout_s=60, grace_s=1)
    failures = info.value.failures
    assert set(failures) == {0, 1}
    assert "KeyError" in failures[1] and "deliberate failure on rank 1" in failures[1]
    # rank 0 hangs: it is stopped grace_s after rank 1 failed, not waited for until timeout_s.
    assert "after rank 1 failed" in failures[0]
    assert "deliberate failure on rank 1" in str(info.value)


def test_a_run_past_its_time_limit_is_stopped_and_reported():
    with pytest.raises(LocalRanksError, match="exceeded timeout_s=4") as info:
        run_local_ranks(sync_workers.sleep_forever, 1, timeout_s=4)
    assert set(info.value.failures) == {0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"world_size": 0}, "world_size: expected an int >= 1"),
        ({"world_size": 2.0}, "world_size: expected an int >= 1"),
        ({"world_size": 2, "backend": "mpi"}, "backend: expected 'gloo' or 'nccl', got 'mpi'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_local_ranks(sync_workers.report_rank, **kwargs)


def test_garbage_holding_the_group_is_collected_before_the_group_is_destroyed(tmp_path):
    # DDP's reducer holds the group from inside a reference cycle; left to interpreter exit, the
    # group's destruction aborted rank processes now and then (bnlab.launch.leave_process_group).
    # Here a cycle stands in for DDP, with automatic collection off: it must be collected while
    # the group is still there.
    assert run_local_ranks(sync_workers.leave_a_cycle, 2, (str(tmp_path),), timeout_s=120) == [0, 1]
    for rank in (0, 1):
        assert (tmp_path / f"witness{rank}").read_text() == "True"
