"""Eval mode with a graph on the CPU kernels: frozen statistics while training, or inference outside no_grad.

The layer normalizes with its running statistics and autograd records the map (BatchNormEvalFunction,
or CpuEvalFromKernel where the compiled eval call makes the node). On the CPU backend the statistics
come from the compiled ``eval_stats`` (as the inference call computes them), and the first-order
backward runs the kernels (``CpuBackend.eval_backward``): dx by
the normalize kernel, Σdy·x̂ and Σdy by the backward kernel's reduction. Checked here: the output has
the bits of the same call under no_grad; dx has the bits of the torch-op formula it replaces; the
parameter gradients match torch.nn in float64; double backward, partial gradients, a dy in another
memory format, an input the kernels do not take, and a negative running variance behave as before.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import bnlab
from bnlab import _fastpath
from bnlab.backends import get_backend
from bnlab.backends.cpu import _CODE, layout_of
from bnlab.stats import compute_dtype
from conftest import TOLERANCE, memory_layouts, randomize_state_, rel_err

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLASSES = {2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d), 3: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d), 5: (bnlab.BatchNorm3d, torch.nn.BatchNorm3d)}  # fmt: skip


def _layers(rank: int, channels: int, affine: bool = True):
    """(bnlab layer, torch.nn layer in float64) in eval mode with the same random state."""
    torch.manual_seed(rank * 10 + channels)
    ours, theirs = (cls(channels, affine=affine) for cls in CLASSES[rank])
    theirs.load_state_dict(randomize_state_(ours).state_dict())
    return ours.eval(), theirs.double().eval()



def _grads(layer, x, dy, create_graph=False):
    xg = x.detach().clone().requires_grad_()
    y = layer(xg)
    wanted = [xg] + [p for p in (layer.weight, layer.bias) if p is not None]
    return y, torch.autograd.grad(y, wanted, dy, create_graph=create_graph)


CASES = [(shape, dtype, affine) for shape in [(16, 7), (5, 6, 9), (4, 3, 5, 6), (2, 3, 2, 3, 4)]
         for dtype in DTYPES for affine in (True, False)]  # fmt: skip


@pytest.mark.parametrize("path", ["compiled call", "Python path"])
@pytest.mark.parametrize("shape,dtype,affine", CASES)
def test_outputs_and_gradients_against_no_grad_the_torch_formula_and_torch_nn(shape, dtype, affine, path):
    """Both ways in: the compiled eval call (bn_eval_module, which makes the node itself) and the
    Python path (functional.eval_with_graph), which must agree to the bit."""
    ours, theirs = _layers(len(shape), shape[1], affine)
    for name, arrange in memory_layouts(len(shape)):
        x = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        dy = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        with _fastpath.python_path_only() if path == "Python path" else contextlib.nullcontext():
            y, grads = _grads(ours, x, dy)
        node = type(y.grad_fn).__name__
        assert node == ("CpuEvalFromKernelBackward" if path == "compiled call" else "BatchNormEvalFunctionBackward")
        with torch.no_grad():
            assert torch.equal(y, ours(x)), name  # the bits of the inference call
        assert y.stride() == x.stride() and grads[0].stride() == x.stride(), name
        # dx: the torch-op formula it replaces, on the same float64 statistics
        mean, invstd = CPU.eval_statistics(ours.running_mean, ours.running_var, ours.eps)
        scale = invstd * (ours.weight.detach().double() if affine else 1.0)
        view = [1, -1] + [1] * (x.dim() - 2)
        cd = compute_dtype(x)
        assert torch.equal(grads[0], (dy.to(cd) * scale.to(cd).view(view)).to(dtype)), name
        # everything against torch.nn in float64
        xd = x.double().requires_grad_()
        y_ref = theirs(xd)
        wanted = [xd] + [p for p in (theirs.weight, theirs.bias) if p is not None]
        expected = torch.autograd.grad(y_ref, wanted, dy.double())
        assert rel_err(y, y_ref) <= TOLERANCE[dtype], name
        for got, want in zip(grads, expected):
            assert got.dtype == (dtype if got.shape == x.shape else torch.float32), name
            assert rel_err(got, want) <= max(TOLERANCE[dtype], TOLERANCE[got.dtype]) * 10, name


def test_large_inputs_run_on_the_threads_and_match_the_portable_backend():
    ours, _ = _layers(4, 16)
    x, dy = torch.randn(16, 16, 32, 32), torch.randn(16, 16, 32, 32)  # pooled outputs, two threads
    y, grads = _grads(ours, x, dy)
    try:
        bnlab.set_backend("portable")
        y_portable, grads_portable = _grads(ours, x, dy)
    finally:
        bnlab.set_backend(None)
    assert rel_err(y, y_portable) <= TOLERANCE[torch.float32]
    assert torch.equal(grads[0], grads_portable[0])  # dx: the same float32 products
    for got, want in zip(grads[1:], grads_portable[1:]):
        assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_frozen_parameters_and_a_frozen_input_get_no_gradient():
    ours, _ = _layers(2, 5)
    x, dy = torch.randn(8, 5), torch.randn(8, 5)
    ours.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    dx, db = torch.autograd.grad(ours(xg), [xg, ours.bias], dy)
    assert rel_err(db, dy.sum(0)) <= TOLERANCE[torch.float32]
    ours.weight.requires_grad_(True)
    (dw,) = torch.autograd.grad(ours(x), [ours.weight], dy)  # x needs no gradient
    x_hat = (x.double() - ours.running_mean.double()) / torch.sqrt(ours.running_var.double() + ours.eps)
    assert rel_err(dw, (dy.double() * x_hat).sum(0)) <= TOLERANCE[torch.float32]


def test_a_gradient_in_another_memory_format_and_an_input_the_kernels_do_not_take():
    ours, theirs = _layers(4, 6)
    x = torch.randn(3, 6, 5, 4)
    dy = torch.randn(3, 6, 5, 4)
    _, plain = _grads(ours, x, dy)
    _, other = _grads(ours, x, dy.contiguous(memory_format=torch.channels_last))
    assert all(torch.equal(a, b) for a, b in zip(plain, other))
    strided = torch.randn(3, 6, 5, 8)[..., ::2]  # neither layout: the kernels run on a contiguous copy
    stats = CPU.eval_statistics(ours.running_mean, ours.running_var, ours.eps)
    on_view = CPU.eval_backward(dy, strided, ours.weight, *stats, True, True, True, torch.float32)
    on_copy = CPU.eval_backward(dy, strided.contiguous(), ours.weight, *stats, True, True, True, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(on_view, on_copy))
    assert on_view[0].stride() == torch.empty_like(strided).stride()
    _, got = _grads(ours, strided, dy)
    xd = strided.double().requires_grad_()
    expected = torch.autograd.grad(theirs(xd), [xd, theirs.weight, theirs.bias], dy.double())
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= TOLERANCE[torch.float32] * 10


def test_double_backward_still_differentiates_the_torch_ops():
    ours, _ = _layers(2, 3)
    ours.double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ours(t), (x,))
    y, (dx, *_) = _grads(ours, x, torch.randn(6, 3, dtype=torch.float64), create_graph=True)
    assert dx.requires_grad


def test_a_negative_running_variance_still_raises_naming_the_channel():
    ours, _ = _layers(2, 4)
    ours.running_var[1] = -0.5
    with pytest.raises(ValueError, match=r"running_var: .* channels \[1\]"):
        ours(torch.randn(3, 4, requires_grad=True))


def test_eval_statistics_equal_the_inference_kernels_and_decline_strided_buffers():
    rm, rv = torch.randn(9), torch.rand(9) + 0.1
    mean, invstd = CPU.eval_statistics(rm, rv, 1e-3)
    assert mean.dtype == invstd.dtype == torch.float64
    assert torch.equal(mean, rm.double())
    assert rel_err(invstd, 1 / torch.sqrt(rv.double() + 1e-3)) <= 1e-15
    assert CPU.eval_statistics(torch.randn(18)[::2], rv, 1e-3) is None


def _record_backward_answers(monkeypatch) -> list:
    """Make CpuBackend.eval_backward_entry record its answers (None: declined)."""
    answers = []
    real = type(CPU).eval_backward_entry

    def recording(self, *args):
        answers.append(real(self, *args))
        return answers[-1]

    monkeypatch.setattr(type(CPU), "eval_backward_entry", recording)
    return answers


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, True, True)]
# (input, weight, bias) gradients wanted; without affine parameters only the input has one (a
# single case: the flags of the absent parameters change nothing)
BACKWARD_CASES = [(*case, needs) for case in CASES for needs in NEEDS if case[2] or needs == NEEDS[0]]


@pytest.mark.parametrize("shape,dtype,affine,needs", BACKWARD_CASES)
def test_the_compiled_backward_has_the_bits_of_the_python_path(shape, dtype, affine, needs, monkeypatch):
    """bn_eval_backward_module (CpuEvalFromKernel's first-order backward) runs the kernel calls of
    CpuBackend.eval_backward from one compiled call: every gradient it returns, for every subset
    wanted, equals the Python path's to the bit, in the parameters' dtypes."""
    ours, _ = _layers(len(shape), shape[1], affine)
    answers = _record_backward_answers(monkeypatch)
    for name, arrange in memory_layouts(len(shape)):
        x = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        dy = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        results = []
        for path in ("compiled call", "Python path"):
            xg = x.detach().clone().requires_grad_(needs[0])
            flags = [needs[1], needs[2]] if affine else []
            for p, flag in zip((ours.weight, ours.bias), flags):
                p.requires_grad_(flag)
            wanted = [t for t, flag in zip((xg, ours.weight, ours.bias), needs) if flag and t is not None]
            with _fastpath.python_path_only() if path == "Python path" else contextlib.nullcontext():
                results.append(torch.autograd.grad(ours(xg), wanted, dy))
        compiled, python = results
        assert answers[-1] is not None, name  # the compiled backward took it
        assert [a is None for a in answers[-1][:3]] == [not flag for flag in needs[: 1 + 2 * affine]] + [True] * (
            0 if affine else 2
        ), name
        for got, want in zip(compiled, python):
            assert got.dtype == want.dtype and got.stride() == want.stride(), name
            assert torch.equal(got, want), name


def test_the_compiled_backward_declines_a_gradient_in_another_dtype_or_memory_format(monkeypatch):
    """Declined (None; the Python path's kernels then run, copying dy to x's layout): a dy with
    other strides or another dtype than x. The gradients are the same either way."""
    ours, _ = _layers(4, 6)
    answers = _record_backward_answers(monkeypatch)
    x, dy = torch.randn(3, 6, 5, 4), torch.randn(3, 6, 5, 4)
    _, plain = _grads(ours, x, dy)
    assert answers[-1] is not None
    stats = torch.stack(CPU.eval_statistics(ours.running_mean, ours.running_var, ours.eps))
    plan = (*layout_of(x), _CODE[x.dtype], 1)
    for other in (dy.contiguous(memory_format=torch.channels_last), dy.double()):
        assert CPU.eval_backward_entry(other, x, stats, ours.weight, plan, (True, True, True), torch.float32) is None
    _, moved = _grads(ours, x, dy.contiguous(memory_format=torch.channels_last))
    assert answers[-1] is None  # declined inside the node; the Python path's kernels ran
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))


def test_the_compiled_backward_names_itself_on_a_wrong_argument_count():
    lib = CPU.kernels()
    with pytest.raises(TypeError, match=r"bn_eval_backward_module: expected 7 arguments, got 2"):
        lib.bn_eval_backward_module(1, 2)
