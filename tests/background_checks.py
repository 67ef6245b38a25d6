"""Slow checks that run in other processes, started when collection ends and run niced beside the suite.

Why: a few checks spend nearly all their time in other processes: the x86-64-v3 build of the
CPU kernels and its comparison with the native build (test_backend_cpu_isa.py, about 60 s), the
sm_90 compile of every Triton kernel variant (test_triton_compile.py, about 95 s on both cores),
and the dry runs of the GPU round and of the tile tuning in Triton's interpreter
(test_gpu_round.py, test_triton_tune.py, 20-30 s each). Run in place they took 3.5 of the
suite's 10 min on the Zen 3 VM, while most other tests are one Python thread and leave the
second core idle. Started at nice 19 once the tests are
collected, they run on that idle time; a test that wants both cores (two OpenMP threads) still
gets them, since a niced process yields to it. The tests that own the checks then only wait for
the results and assert on them as before.

A test module declares its check at import (:func:`register`), the test carries
``@pytest.mark.background(name)``, and asks the ``background`` fixture for the results
(:meth:`Checks.result`). A check whose test is not selected never starts; one asked for before it
was started (a run that bypassed collection's hook) runs at once. Checks run one after another in
the order registered, the commands of one check all at once; outputs go to files (a pipe could
fill and hold a process). When the session ends, whatever still runs is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Output:
    """One command's exit status and output, read back from its files; ``folder`` is the check's
    own (what its commands wrote there stays until the session ends)."""

    returncode: int
    stdout: str
    stderr: str
    folder: Path


Make = Callable[[Path], list[tuple[list[str], dict]]]  # folder -> [(argv, env)], run all at once

#: The checks declared by the test modules: name -> make.
_REGISTRY: dict[str, Make] = {}


@dataclass
class _Run:
    """One Checks object's run of one check."""

    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None

# Each command in a process group of its own, so that closing kills it with what it started (g++'s
# cc1plus, ptxas). A group, not a session (start_new_session): Linux's autogroup scheduling shares
# the CPU between sessions first, and a command in a session of its own took as much CPU as the
# suite however niced (the suite took 9 min 2-15 s against 7 min 21 s). Python 3.10 has no
# process_group: there closing kills the commands only.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {}


def register(name: str, make: Make) -> None:
    """Declare a check: ``make(folder)`` returns the commands (argv, environment) to run at once,
    with ``folder`` theirs to write in; it runs only if a selected test is marked with ``name``."""
    _REGISTRY.setdefault(name, make)


class Checks:
    """The session's background checks (the ``background`` fixture)."""

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="bnlab-background-"))
        self._lock = threading.Lock()
        self._running: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._runs: dict[str, _Run] = {}  # the checks started, by name
        self._closed = False
        # nice(1) where there is one: the checks then take only the CPU time the tests leave
        self._nice = ["nice", "-n", "19"] if shutil.which("nice") else []

    def start(self, names: list[str]) -> None:
        """Run the named checks one after another in a background thread."""
        with self._lock:
            todo = [name for name in names if name in _REGISTRY and name not in self._runs]
            for name in todo:
                self._runs[name] = _Run()
        if todo:
            thread = threading.Thread(target=lambda: [self._run(name) for name in todo], daemon=True)
            self._threads.append(thread)
            thread.start()

    def result(self, name: str, timeout: float = 1500) -> list[Output]:
        """The outputs of check ``name``'s commands, in the order made; waits for them (starting
        the check here if nothing started it)."""
        if name not in _REGISTRY:
            raise KeyError(f"name: expected a registered background check {sorted(_REGISTRY)}, got {name!r}")
        with self._lock:
            start_here = name not in self._runs
            check = self._runs.setdefault(name, _Run())
        if start_here:
            self._run(name)
        if not check.done.wait(timeout):
            raise TimeoutError(f"background check {name!r} still running after {timeout:.0f} s")
        if check.error is not None:
            raise RuntimeError(f"background check {name!r} could not run: {check.error}")
        return check.outputs

    def _run(self, name: str) -> None:
        check = self._runs[name]
        try:
            folder = self._root / name
            folder.mkdir()
            commands = _REGISTRY[name](folder)
            processes = []
            for k, (argv, env) in enumerate(commands):
                with self._lock:
                    if self._closed:
                        raise RuntimeError("the session ended first")
                    with open(folder / f"out{k}.txt", "w") as out, open(folder / f"err{k}.txt", "w") as err:
                        process = subprocess.Popen(self._nice + argv, env=env, stdout=out, stderr=err, **_OWN_GROUP)
                    self._running.append(process)
                processes.append(process)
            for process in processes:
                process.wait()
            check.outputs = [
                Output(p.returncode, (folder / f"out{k}.txt").read_text(), (folder / f"err{k}.txt").read_text(),
                       folder)
                for k, p in enumerate(processes)
            ]
        except Exception as exc:  # reported by result(), in the test that asked
            check.error = f"{type(exc).__name__}: {exc}"
        finally:
            check.done.set()

    def close(self) -> None:
        """Kill what still runs, let the runner threads record it, and remove the output files."""
        with self._lock:
            self._closed = True
            for process in self._running:
                if process.poll() is None:
                    try:
                        if _OWN_GROUP:
                            os.killpg(process.pid, signal.SIGKILL)
                        else:
                            process.kill()
                    except OSError:  # gone meanwhile
                        pass
        for process in self._running:
            process.wait()
        for thread in self._threads:
            thread.join(timeout=60)
        shutil.rmtree(self._root, ignore_errors=True)


CHECKS = Checks()


def marked_checks(items) -> list[str]:
    """The check names that the selected test items are marked with, in registration order."""
    wanted = {mark.args[0] for item in items for mark in item.iter_markers("background")}
    return [name for name in _REGISTRY if name in wanted]


def environment(**extra: str) -> dict:
    """This process's environment for a check's command, with ``src`` and ``tests`` on PYTHONPATH,
    without TRITON_INTERPRET (conftest.py sets it for this process; checks compile for real), plus ``extra``."""
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = (str(tests.parent / "src"), str(tests), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env
