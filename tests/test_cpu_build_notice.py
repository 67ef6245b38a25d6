"""The first use on a new machine compiles the CPU kernels (about half a minute): bnlab says so on
stderr while it waits, and when it is done or has failed; a cached library loads silently."""

from __future__ import annotations

import shutil

import pytest

from bnlab.backends import cpu_build


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """cpu_build as in a new process with an empty cache in tmp_path; its state restored after."""
    saved = dict(cpu_build._state)
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BNLAB_CPU_KERNELS", raising=False)
    yield tmp_path
    cpu_build._state.clear()
    cpu_build._state.update(saved)


def test_a_compile_is_announced_and_timed_and_a_cached_library_loads_silently(fresh_state, monkeypatch, capsys):
    built = cpu_build.load()
    if built is None or cpu_build.library_path() is None:
        pytest.skip(f"the CPU kernels did not build here: {cpu_build.load_error()}")
    real = cpu_build.library_path()

    def compile_by_copy(cxx, flags, target):  # the real library stands in for a fresh compile
        shutil.copyfile(real, target)
        return None

    monkeypatch.setattr(cpu_build, "_variants", lambda: [("ctypes", ["-fopenmp"])])
    monkeypatch.setattr(cpu_build, "_compile", compile_by_copy)
    capsys.readouterr()
    assert cpu_build._build_and_load() is not None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("bnlab: compiling its CPU kernels for this machine, once (ctypes build")
    assert str(fresh_state) in err[0]
    assert err[1].startswith("bnlab: CPU kernels compiled in ") and err[1].endswith(" s")
    assert cpu_build._build_and_load() is not None  # now cached: no compile, no message
    assert capsys.readouterr().err == ""


def test_failed_builds_are_announced_with_the_fallback(fresh_state, monkeypatch, capsys):
    monkeypatch.setattr(cpu_build, "_variants", lambda: [("ctypes", ["-fopenmp"]), ("ctypes", [])])
    monkeypatch.setattr(cpu_build, "_compiler", lambda: "g++")
    monkeypatch.setattr(cpu_build, "_compile", lambda cxx, flags, target: f"g++ {' '.join(flags)} failed: no")
    assert cpu_build._build_and_load() is None
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0].split(" after")[0] for line in err] == [
        "bnlab: compiling its CPU kernels for this machine, once", "bnlab: that build failed",
        "bnlab: compiling its CPU kernels for this machine, once", "bnlab: that build failed",
        "bnlab: no build of the CPU kernels worked: the portable backend runs instead, slower",
    ]  # fmt: skip
    assert "g++ -fopenmp failed: no" in cpu_build._state["error"]
