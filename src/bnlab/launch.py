"""Run a function on N local processes joined in one torch.distributed group, with timeouts everywhere.

``run_local_ranks(fn, 4)`` is what tests, benchmarks and the lab use to exercise SyncBatchNorm on
one machine without torchrun: it spawns fresh processes, joins them through a file store in a
private temporary folder (no port to pick, nothing left behind), runs ``fn(rank, world_size,
*args)`` on each, and returns their results in rank order. A rank that raises, dies or hangs
never hangs the caller: the initialisation and every collective time out, the other ranks are
stopped shortly after the first failure, and one error reports what happened on each rank.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

__all__ = ["run_local_ranks", "LocalRanksError", "leave_process_group"]


class LocalRanksError(RuntimeError):
    """One or more ranks of :func:`run_local_ranks` failed, died, or ran past the time limit.

    Attributes:
        failures: rank -> what happened there (a traceback, an exit code, or why it was stopped).
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def _loopback_interface() -> str | None:
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), or None if none is found."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def leave_process_group() -> None:
    """``torch.distributed.destroy_process_group()``, after collecting the garbage that may still hold the group.

    DistributedDataParallel and its reducer sit in reference cycles, and the reducer holds the
    group: after ``destroy_process_group`` alone the group lives on until the garbage collector
    finds the cycle, which may be at interpreter exit, when the group's gloo threads are torn down
    with the interpreter half gone. Rank processes of the lab's ``small-batch-sync`` then died now
    and then with "terminate called without an active exception" (SIGABRT) after reporting their
    results: 13 of 240 rank processes that had trained a small DDP model, none of 240 with the
    collection first (benchmarks/rank_exit_aborts.py; docs/benchmark_rounds.md, forty-third session).
    Does nothing where no default group exists (never made, or left already: a ``fn`` of
    :func:`run_local_ranks` that leaves it itself, before the rank's own call).
    """
    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: exit status of a rank that ended because the process that started it died
ORPHANED_EXIT = 75
#: how often a rank looks whether the process that started it is still there (seconds)
_PARENT_POLL_S = 0.5


def _end_with_parent(parent: int) -> None:
    """End this process as soon as ``parent``, the process that started it, is gone.

    Why: a caller killed outright (SIGKILL, an out-of-memory kill) cannot stop its ranks, which
    would go on alone: a lab run's ranks kept training and saving units, and a rerun with
    ``--resume`` then trained the same units twice at once, each at half speed. A daemon thread
    polls the parent's pid (portable, and immune to prctl's death signal firing when the
    *thread* that started the process exits); os._exit ends the process even inside a collective.
    Units already saved stay (each is written atomically).
    """
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="bnlab-parent-watch", daemon=True).start()


def _rank_main(rank, world_size, folder, backend, collective_timeout_s, threads, fn, args, parent=None) -> None:
    """Body of one spawned process: join the group, run fn, write ("ok", value) or ("error", traceback)."""
    if parent is not None:
        _end_with_parent(parent)
    try:
        import torch
        import torch.distributed as dist

        if threads is not None:
            torch.set_num_threads(threads)  # N ranks on a few cores: avoid N × cores threads
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(os.path.join(folder, "store"), world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
        )
        try:
            payload = ("ok", fn(rank, world_size, *args))
        finally:
            leave_process_group()
        data = pickle.dumps(payload)  # by value: the parent reads it after this process is gone
    except BaseException:  # noqa: BLE001 - everything, including SystemExit, is reported to the parent
        data = pickle.dumps(("error", traceback.format_exc()))
    _write_atomically(os.path.join(folder, f"rank{rank}.pkl"), data)


def _stop(process) -> None:
    process.terminate()
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    collective_timeout_s: float = 60.0,
    grace_s: float = 3.0,
    threads_per_rank: int | None = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes that form one process group.

    Args:
        fn: a module-level function that the new processes can import (in a script, start the run
            under ``if __name__ == "__main__":``); its return value must be picklable.
        world_size: number of processes (>= 1).
        args: extra positional arguments, pickled to every rank (tensors included).
        backend: ``"gloo"`` (CPU, loopback) or ``"nccl"`` (rank r uses GPU r mod the device count).
        timeout_s: wall-clock limit for the whole run, process start-up included.
        collective_timeout_s: limit on joining the group and on each collective inside ``fn``.
        grace_s: how long the other ranks may still finish after one rank failed, before they are stopped.
        threads_per_rank: ``torch.set_num_threads`` in each rank (None leaves torch's default).

    Returns:
        The return values of ``fn``, in rank order.

    Raises:
        LocalRanksError: a rank raised, exited without a result, or the run exceeded ``timeout_s``;
            the message holds each failed rank's traceback or fate.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1 (number of processes), got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
    with tempfile.TemporaryDirectory(prefix="bnlab-ranks-") as folder:
        loopback = _loopback_interface()
        saved_env = os.environ.get("GLOO_SOCKET_IFNAME")
        if backend == "gloo" and loopback is not None and saved_env is None:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback  # children inherit it: stay on 127.0.0.1
        processes = []
        # The ranks start with Ctrl-C ignored (the disposition survives their exec, and Python then
        # installs no KeyboardInterrupt handler): the terminal's SIGINT reaches every process of its
        # group, and each rank printed its own traceback, some forty lines from within `import torch`
        # before this process's one-line advice; this process stops them itself (_stop, below).
        ignoring = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignoring else None
        try:
            for rank in range(world_size):
                process = context.Process(
                    target=_rank_main,
                    args=(rank, world_size, folder, backend, collective_timeout_s, threads_per_rank, fn, tuple(args),
                          os.getpid()),
                    name=f"bnlab-rank{rank}",
                )
                process.start()
                processes.append(process)
        finally:
            if ignoring:
                signal.signal(signal.SIGINT, previous)
            if saved_env is None:
                os.environ.pop("GLOO_SOCKET_IFNAME", None)
        try:
            return _collect(processes, folder, time.monotonic() + timeout_s, grace_s, timeout_s)
        finally:
            for process in processes:
                if process.is_alive():
                    _stop(process)


def _collect(processes, folder, deadline, grace_s, timeout_s) -> list[Any]:
    """Wait for every rank's result; stop the rest after a failure or at the deadline."""
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    first_failure_at = None
    pending = set(range(len(processes)))
    while pending:
        for rank in sorted(pending):
            process = processes[rank]
            if process.is_alive():
                continue
            process.join()
            pending.discard(rank)
            path = os.path.join(folder, f"rank{rank}.pkl")
            if not os.path.exists(path):
                failures[rank] = f"exited with code {process.exitcode} without reporting a result"
            else:
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
                if status == "ok":
                    results[rank] = value
                else:
                    failures[rank] = value
            if rank in failures and first_failure_at is None:
                first_failure_at = time.monotonic()
        now = time.monotonic()
        stop_reason = None
        if pending and first_failure_at is not None and now > first_failure_at + grace_s:
            stop_reason = f"stopped {grace_s:g} s after rank {min(failures)} failed (probably waiting in a collective)"
        elif pending and now > deadline:
            stop_reason = f"stopped: the run exceeded timeout_s={timeout_s:g} s"
        if stop_reason is not None:
            for rank in sorted(pending):
                _stop(processes[rank])
                failures[rank] = stop_reason
            pending.clear()
        time.sleep(0.02)
    if failures:
        report = "\n".join(f"--- rank {rank}: {failures[rank]}" for rank in sorted(failures))
        raise LocalRanksError(
            f"{len(failures)} of {len(processes)} ranks failed (ranks {sorted(failures)}):\n{report}", failures
        )
    return [results[rank] for rank in range(len(processes))]
