"""bnlab.launch.run_local_ranks: results in rank order, and failures or hangs reported, never waited on forever."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from bnlab.launch import LocalRanksError, run_local_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the ranks import sync_workers too
import sync_workers  # noqa: E402


def test_results_come_back_in_rank_order_from_one_process_group():
    tensor = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    handler = signal.getsignal(signal.SIGINT)
    results = run_local_ranks(sync_workers.report_rank, 3, (tensor,), timeout_s=120, collective_timeout_s=30)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world_size"] == 3 for r in results)
    for r in results:  # all_reduce of rank·tensor over ranks 0, 1, 2 = 3·tensor: the ranks really talked
        assert torch.equal(r["sum"], 3 * tensor)
    # Ctrl-C is this process's to handle: the ranks had each printed a traceback (the lab audit of
    # the fiftieth session); this process's own handler is back after the start
    assert all(r["ctrl_c_ignored"] for r in results)
    assert signal.getsignal(signal.SIGINT) is handler


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


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie, which nobody may reap in a container, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_ranks_end_when_the_process_that_started_them_is_killed(tmp_path):
    # A caller killed outright cannot stop its ranks: they went on alone (a lab run's kept training
    # and saving units, and a --resume then trained the same units twice at once).
    import signal
    import subprocess
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import sync_workers; from bnlab.launch import run_local_ranks; "
            f"run_local_ranks(sync_workers.write_pid_and_sleep, 2, ({str(tmp_path)!r},), timeout_s=300)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.pid").exists() for r in range(2)):
            assert parent.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(2)]
        assert all(_running(pid) for pid in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived the process that started them"


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


def test_leaving_the_group_twice_or_without_one_does_nothing_more():
    # torch's destroy_process_group raised an AssertionError without a group; a rank function that
    # left the group itself then failed after returning, in run_local_ranks' own leave
    from bnlab.launch import leave_process_group

    leave_process_group()  # no group in this process
    assert run_local_ranks(sync_workers.leave_the_group_first, 2, timeout_s=120) == [0, 1]
