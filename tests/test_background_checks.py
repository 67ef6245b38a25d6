"""The background checks' runner (tests/background_checks.py): results come back whole, failures are named."""

from __future__ import annotations

import os
import sys
import time

import pytest

import background_checks
from background_checks import Checks


def _python(code: str) -> tuple[list[str], dict]:
    return [sys.executable, "-c", code], background_checks.environment()


def test_a_started_check_gives_each_commands_output_in_order():
    commands = [_python("print('first')"), _python("import sys; sys.exit(3)")]
    background_checks.register("runner-two", lambda folder: commands)
    checks = Checks()
    try:
        checks.start(["runner-two", "not-registered"])  # an unknown name is no check: ignored
        first, second = checks.result("runner-two", timeout=120)
        assert (first.returncode, first.stdout.strip()) == (0, "first")
        assert second.returncode == 3
    finally:
        checks.close()


def test_a_check_never_started_runs_when_asked_and_a_broken_one_is_named():
    background_checks.register("runner-late", lambda folder: [_python("print(2 + 2)")])
    background_checks.register("runner-broken", lambda folder: 1 / 0)
    checks = Checks()
    try:
        (out,) = checks.result("runner-late", timeout=120)
        assert out.stdout.strip() == "4"
        with pytest.raises(RuntimeError, match="'runner-broken' could not run: ZeroDivisionError"):
            checks.result("runner-broken", timeout=120)
        with pytest.raises(KeyError, match="name: expected a registered background check .* got 'runner-unknown'"):
            checks.result("runner-unknown")
    finally:
        checks.close()


# A command that starts a process of its own (as g++ starts cc1plus), prints that one's pid and waits.
_PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def _alive(pid: int) -> bool:
    """Whether the process runs: a zombie (killed, not yet reaped by whoever adopted it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone meanwhile, or no /proc
        return not os.path.exists(f"/proc/{pid}")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Popen's process_group is Python 3.11's")
def test_closing_kills_what_still_runs_and_what_it_started():
    background_checks.register("runner-slow", lambda folder: [_python(_PARENT)])
    checks = Checks()
    checks.start(["runner-slow"])
    folder = checks._root / "runner-slow"
    deadline = time.monotonic() + 60
    while not ((folder / "out0.txt").exists() and (folder / "out0.txt").read_text().strip()):
        assert time.monotonic() < deadline, "the command never printed its child's pid"
        time.sleep(0.1)
    began = time.monotonic()
    checks.close()
    assert time.monotonic() - began < 30
    (out,) = checks.result("runner-slow", timeout=1)  # recorded before close() returned
    assert out.returncode != 0  # killed, not finished
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10  # killed with the command's session; reaped by init meanwhile
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"the command's own child {child} outlived close()"


class _Item:
    """What marked_checks reads of a collected test: its markers."""

    def __init__(self, *names: str) -> None:
        self.marks = [pytest.mark.background(name).mark for name in names]

    def iter_markers(self, name: str):
        return [mark for mark in self.marks if mark.name == name]


def test_the_marked_checks_are_those_of_the_selected_tests_in_registration_order():
    for name in ("runner-a", "runner-b"):
        background_checks.register(name, lambda folder: [])
    assert background_checks.marked_checks([_Item("runner-b"), _Item(), _Item("runner-a", "runner-b")]) == [
        "runner-a",
        "runner-b",
    ]
    assert background_checks.marked_checks([_Item("runner-b"), _Item("never-registered")]) == ["runner-b"]
    assert background_checks.marked_checks([_Item()]) == []
