"""What `bnlab selfcheck` says about the backends (bnlab.backends.describe, cpu_build.status): which
backend a CPU tensor gets, which compiled library loaded, and why a better variant did not build,
so that a user can tell whether the fast path runs without reading the code."""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import cpu_build, cpu_build_torch, describe, select_backend

LIB = cpu_build.load()
needs_kernels = pytest.mark.skipif(LIB is None, reason=f"the CPU kernels did not build: {cpu_build.load_error()}")


@needs_kernels
def test_status_names_the_loaded_library_and_describe_the_cpu_backend():
    text = cpu_build.status()
    assert cpu_build.library_path() in text
    kind = "extension module" if hasattr(LIB, "bn_empty") else "ctypes library"
    assert text.startswith(f"compiled CPU kernels: {kind}")
    if "-march=native" in text:  # what the native build could use, as /proc/cpuinfo reports it
        flags = set(cpu_build._cpu_signature().split(":", 1)[-1].split())
        named = text.split("vector extensions: ", 1)[1].split(")", 1)[0].split()
        assert named == ([f for f in cpu_build._VECTOR_FLAGS if f in flags] or ["none"])
    lines = describe().splitlines()
    assert select_backend(torch.empty(2, 1)).name == "cpu"
    assert lines[0] == "backend for CPU tensors: cpu"
    assert lines[1] == text.splitlines()[0]
    assert lines[-1].startswith("Triton kernels: ")


def test_status_says_why_there_are_no_kernels(monkeypatch):
    state = dict(cpu_build._state, tried=True, lib=None, error="no C++ compiler found")
    monkeypatch.setattr(cpu_build, "_state", state)
    assert cpu_build.status() == (
        "compiled CPU kernels unavailable (no C++ compiler found); the portable backend runs on the CPU"
    )


@needs_kernels
def test_status_reports_a_variant_that_did_not_build(monkeypatch, tmp_path):
    # The best variant fails to compile (a flag the compiler refuses); the next is this process's
    # own library, already in the cache under its key, so nothing else compiles.
    loaded = cpu_build._state["variant"]
    monkeypatch.setattr(cpu_build, "_variants", lambda: [("module", ["-fbnlab-no-such-flag"]), loaded])
    monkeypatch.setattr(cpu_build, "_state", dict(cpu_build._state, tried=False, lib=None, skipped=[], seconds=None))
    assert cpu_build.load() is not None
    text = cpu_build.status()
    first, second = text.splitlines()
    assert first.startswith("compiled CPU kernels:") and cpu_build.library_path() in first
    assert second.startswith("  a better variant did not build: ") and "bnlab-no-such-flag" in second


def test_describe_names_a_pinned_backend_that_takes_no_cpu_tensors(monkeypatch):
    import bnlab.backends as backends

    monkeypatch.setattr(backends, "_PINNED", "triton")  # the Triton backend takes CUDA tensors only
    first = backends.describe().splitlines()[0]
    assert first == "backend for CPU tensors: none (pinned by set_backend or BNLAB_BACKEND: 'triton')"


def test_an_unknown_backend_from_the_environment_is_blamed_on_the_variable(monkeypatch):
    """BNLAB_BACKEND is read unchecked at import (a backend of that name may be registered after);
    an unknown one had been named as set_backend's argument 'name'."""
    import bnlab.backends as backends

    monkeypatch.setattr(backends, "_PINNED", "bogus")
    monkeypatch.setattr(backends, "_PINNED_BY_ENVIRONMENT", True)
    with pytest.raises(ValueError, match=r"^BNLAB_BACKEND: expected one of the registered backends .*, got 'bogus'$"):
        backends.select_backend(torch.randn(4, 3))
    monkeypatch.setattr(backends, "_PINNED_BY_ENVIRONMENT", False)  # pinned in code: the argument's name
    with pytest.raises(ValueError, match=r"^name: expected one of the registered backends"):
        backends.select_backend(torch.randn(4, 3))


@needs_kernels
def test_the_torch_build_is_the_one_loaded_where_torch_ships_its_headers():
    # A compile error in cpu_kernels_torch.cpp would only cost speed (the plain extension module
    # is built instead, and every other test passes on it): this test is what notices.
    if cpu_build._python_include() is None or not cpu_build_torch.compile_flags():
        pytest.skip("no Python.h or no torch headers here: the torch build is not tried")
    kind, flags = cpu_build._state["variant"]
    assert kind == "torch" and cpu_build.TORCH_API in flags, cpu_build.status()
    assert cpu_build._state["skipped"] == []
