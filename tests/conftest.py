"""Shared fixtures: the backends under test and a scale-relative closeness check."""

from __future__ import annotations

import os

# Triton's interpreter runs bnlab's GPU kernels on CPU tensors in tests/test_triton*.py. Set here,
# before any test module is collected: when Triton was imported before the variable was set (a
# module that imported torch._dynamo.testing at collection, which imports inductor and Triton),
# every interpreted kernel call failed ("Cannot call @triton.jit'd outside of the scope of a kernel").
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bnlab  # noqa: E402
from bnlab import reference  # noqa: E402
from bnlab.backends import get_backend  # noqa: E402


def _cpu_backends() -> list[str]:
    """Every registered backend that claims CPU float32 tensors: each must pass the conformance tests."""
    probe = torch.zeros(2, 3)
    return [name for name in bnlab.available_backends() if get_backend(name).supports(probe)]


CPU_BACKENDS = _cpu_backends()


@pytest.fixture(autouse=True)
def _grad_mode_left_on():
    """Fail the test that leaves autograd's grad mode off (as a benchmark script's main() that
    calls torch.set_grad_enabled(False) did), rather than a later test that needs gradients."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd's grad mode off")


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after the test: benchmark scripts' main() sets it (--threads)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Pin bnlab to one backend for the duration of a test, then return to automatic choice."""
    bnlab.set_backend(request.param)
    yield request.param
    bnlab.set_backend(None)


# Agreement required with torch.nn and with the float64 reference, relative to the scale of the
# quantity compared (bnlab.reference.TOLERANCE, keyed here by torch dtype).
TOLERANCE = {getattr(torch, name): tol for name, tol in reference.TOLERANCE.items()}


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|), computed in float64 (NaN-aware: NaN != number)."""
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual.detach()).double()
    e = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected.detach()).double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    if bool(nan_mismatch.any()):
        return float("inf")
    diff = torch.where(torch.isnan(e), torch.zeros_like(a), (a - e).abs())
    scale = max(1.0, float(torch.nan_to_num(e, nan=0.0).abs().max()))
    return float(diff.max()) / scale


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} exceeds {tol:.1g}"


def randomize_state_(layer):
    """Random running statistics (variances in [0.5, 2]) and affine parameters for a BN layer, in
    place, each where the layer has it; returns the layer."""
    if layer.running_mean is not None:
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    return layer


def memory_layouts(rank: int):
    """(name, arrange) for each memory layout bnlab's CPU kernels take at this rank: contiguous,
    channels outermost (rank 2), channels_last (rank 4), channels_last_3d (rank 5)."""
    yield "contiguous", lambda x: x
    if rank == 2:
        yield "channels outermost", lambda x: x.t().contiguous().t()
    if rank == 4:
        yield "channels_last", lambda x: x.contiguous(memory_format=torch.channels_last)
    if rank == 5:
        yield "channels_last_3d", lambda x: x.contiguous(memory_format=torch.channels_last_3d)


def record_entry_answers(monkeypatch, getter: str) -> list:
    """Make bnlab._fastpath's ``getter`` (cpu_eval_entry or cpu_train_entry) hand out a recording
    wrapper of the compiled entry; returns the list of its answers (None: declined).

    The compiled layer call (``_fastpath.LAYER_CALL``), which would reach the entry from C before
    the getter is asked, is switched off for the test (tests/test_layer_call.py tests it)."""
    import bnlab._fastpath as fastpath

    monkeypatch.setitem(fastpath.LAYER_CALL, "call", None)

    answers = []
    real_getter = getattr(fastpath, getter)

    def spy():
        entry = real_getter()

        def recording(*args):
            answers.append(entry(*args))
            return answers[-1]

        return recording

    monkeypatch.setattr(fastpath, getter, spy)
    return answers


# -- slow checks in other processes, run niced beside the suite (tests/background_checks.py) ------
from background_checks import CHECKS, marked_checks  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "background(name): the test reads the results of a background check (tests/background_checks.py)"
    )


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        CHECKS.start(marked_checks(session.items))


def pytest_sessionfinish(session):
    CHECKS.close()


@pytest.fixture(scope="session")
def background():
    """The session's background checks: ``background.result(name)`` waits for one's outputs."""
    return CHECKS
