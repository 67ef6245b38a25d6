"""The eval kernels' negative-variance flag, kept per stream on a GPU (triton_ops.variance_flag).

On a GPU one flag serves every eval call on a stream: each kernel only ever clears it, and the
asynchronous check that follows the kernel on the stream reads it. These tests take CPU tensors
for GPU ones (triton_launch's ``_on_gpu``, ``_current_device`` and ``_stream`` stood in, as in
test_triton_launch.py), so that the kept flag is used while the interpreter runs the real kernels;
the check then reads the flag at once, as it does for any tensor not on CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import bnlab  # noqa: E402
from bnlab.backends import _REGISTRY, PortableBackend, triton_launch  # noqa: E402
from bnlab.backends.triton_backend import TritonBackend  # noqa: E402
from speed_helpers import assert_close, make_input  # noqa: E402

TRITON = TritonBackend(allow_cpu=True, self_check=False)

# One case per eval kernel: the one-program kernel (rows of few channels), eval_kernel (one
# launch, NCHW rows of many values) and eval_coef_kernel + normalize (channels-last tiles, with
# the one-program kernels off: at sizes the interpreter runs quickly they would take them).
KERNELS = {
    "small_eval_kernel": ((6, 5), "nchw"),
    "eval_kernel": ((3, 5, 6, 7), "nchw"),
    "eval_coef_kernel": ((3, 5, 4, 7), "cl"),
}


@pytest.fixture
def ops(request, monkeypatch):
    ops = TRITON.ops()
    if getattr(request, "param", None) == "eval_coef_kernel" or "eval_coef_kernel" in request.node.name:
        monkeypatch.setattr(ops, "SMALL_NUMEL", 0)
    return ops


@pytest.fixture
def triton_first():
    saved = list(_REGISTRY)
    _REGISTRY[:] = [TRITON, PortableBackend()]
    yield
    _REGISTRY[:] = saved


@pytest.fixture
def stand_in_gpu(monkeypatch, ops):
    """CPU tensors taken for GPU ones on stream 77 of device 0, the launches made through Triton's
    interpreter (direct launches off: the interpreter compiles nothing to launch directly)."""
    monkeypatch.setattr(triton_launch, "ENABLED", False)
    monkeypatch.setattr(triton_launch, "_on_gpu", lambda t: True)
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_stream", lambda device: 77)
    monkeypatch.setattr(ops, "_FLAGS", {})
    yield


def _case(kernel: str):
    shape, layout = KERNELS[kernel]
    x = make_input(shape, layout, seed=7)
    c = shape[1]
    return x, torch.zeros(c), torch.ones(c), torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5, torch.randn(c)


def _which_kernel(ops, x) -> str:
    p = ops.plan(x)
    if ops.one_program(p):
        return "small_eval_kernel"
    return "eval_kernel" if ops.eval_one_launch(p) else "eval_coef_kernel"


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_cases_reach_each_eval_kernel(ops, kernel):
    assert _which_kernel(ops, _case(kernel)[0]) == kernel


def test_one_flag_per_stream_is_kept_on_a_gpu(ops, stand_in_gpu, monkeypatch):
    x = torch.zeros(4, 3)
    first = ops.variance_flag(x)
    assert ops.variance_flag(x) is first and int(first) == 1
    monkeypatch.setattr(triton_launch, "_stream", lambda device: 78)
    other = ops.variance_flag(x)
    assert other is not first and ops.variance_flag(x) is other
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 1)
    assert ops.variance_flag(x) is not other, "another current device: another stream"


def test_a_new_flag_each_call_off_the_gpu_and_while_a_graph_is_captured(ops, stand_in_gpu, monkeypatch):
    monkeypatch.setattr(triton_launch, "capturing", lambda: True)
    x = torch.zeros(4, 3)
    assert ops.variance_flag(x) is not ops.variance_flag(x) and ops._FLAGS == {}
    monkeypatch.setattr(triton_launch, "capturing", lambda: False)
    monkeypatch.setattr(triton_launch, "_on_gpu", lambda t: t.is_cuda)  # the truth: a CPU tensor
    first = ops.variance_flag(x)
    assert int(first) == 1 and ops.variance_flag(x) is not first and ops._FLAGS == {}


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # the interpreter's NumPy, on -0.5
@pytest.mark.parametrize("kernel", KERNELS)
def test_a_kernel_clears_the_flag_on_a_negative_variance_and_never_sets_it(ops, stand_in_gpu, kernel):
    """The property that makes one flag per stream safe: a call with valid statistics after one
    with a negative variance (two host threads' calls, interleaved on one stream) leaves the flag
    cleared for the first call's check."""
    x, mean, var, weight, bias = _case(kernel)
    bad = var.clone()
    bad[2] = -0.5
    _, ok = ops.normalize_with(x, mean, bad, weight, bias, 1e-5, given_invstd=False)
    assert int(ok) == 0
    y, ok_again = ops.normalize_with(x, mean, var, weight, bias, 1e-5, given_invstd=False)
    assert ok_again is ok and int(ok) == 0, "a valid call set the flag back before the first call's check"
    mean, var, weight, bias = (v.double().reshape(1, -1, *[1] * (x.dim() - 2)) for v in (mean, var, weight, bias))
    expected = (x.double() - mean) / torch.sqrt(var + 1e-5) * weight + bias
    assert_close(y, expected, 2e-4, "eval output beside a cleared flag")
    ok.fill_(1)
    ops.normalize_with(x, *_case(kernel)[1:], 1e-5, given_invstd=False)
    assert int(ok) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
@pytest.mark.parametrize("kernel,fused", [(k, False) for k in KERNELS] + [("eval_kernel", True), ("eval_coef_kernel", True)])
def test_layer_calls_sharing_the_flag_raise_exactly_on_negative_variances(ops, stand_in_gpu, triton_first, monkeypatch,
                                                                          kernel, fused):  # fmt: skip
    """Good, negative, good, negative...: BatchNorm1d/2d, and BatchNormAct2d (4-d inputs only). The
    flag is set again after each failure, so the good calls read it as set and never reach the
    slow check that names the channels."""
    from bnlab.backends import triton_backend

    named = []
    check = triton_backend.check_running_var_nonnegative
    monkeypatch.setattr(triton_backend, "check_running_var_nonnegative", lambda v: named.append(1) or check(v))
    x = _case(kernel)[0]
    c = x.shape[1]
    layer = (bnlab.BatchNormAct2d(c) if fused else (bnlab.BatchNorm2d if x.dim() == 4 else bnlab.BatchNorm1d)(c)).eval()
    expected = x / (1 + 1e-5) ** 0.5
    expected = torch.relu(expected) if fused else expected
    with torch.no_grad():
        for round_ in range(2):
            assert_close(layer(x), expected, 2e-4, f"eval, round {round_}")
            layer.running_var[c - 1] = -0.25
            with pytest.raises(ValueError, match=rf"running_var.*channels \[{c - 1}\]"):
                layer(x)
            layer.running_var[c - 1] = 1.0
    assert len(ops._FLAGS) == 1, "every call used the stream's one flag"
    assert len(named) == 2, "the channels were looked for once per failing call, and only then"
