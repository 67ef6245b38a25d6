"""bnlab.functional.batch_norm: torch.nn.functional.batch_norm's semantics, bnlab's own computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab
from bnlab.functional import batch_norm
from conftest import assert_close


class _RecordOps(TorchDispatchMode):
    """Records the name of every ATen op that runs underneath."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_native_batch_norm_op_runs(backend):
    """Forward (train and eval) and backward never reach ATen's batch-norm kernels."""
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    control = _RecordOps()
    with control:
        F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True).sum().backward()
    assert any("batch_norm" in op for op in control.ops), "the recorder must see torch's own BN ops"
    recorder = _RecordOps()
    with recorder:
        batch_norm(x, rm, rv, w, b, training=True).pow(2).sum().backward()
        batch_norm(x, rm, rv, w, b, training=False).pow(2).sum().backward()
    assert recorder.ops, "nothing was recorded"
    assert not [op for op in recorder.ops if "batch_norm" in op or "native_norm" in op]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 2, 3, 4)])
def test_matches_torch_functional(backend, training, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    w, b = torch.rand(shape[1], generator=gen, dtype=torch.float64), torch.randn(shape[1], generator=gen, dtype=torch.float64)
    rm1, rv1 = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    for momentum in (0.1, 0.3):
        y1 = batch_norm(x, rm1, rv1, w, b, training=training, momentum=momentum, eps=1e-3)
        y2 = F.batch_norm(x, rm2, rv2, w, b, training=training, momentum=momentum, eps=1e-3)
        assert_close(y1, y2, 1e-12, "output")
        assert_close(rm1, rm2, 1e-12, "running_mean")
        assert_close(rv1, rv2, 1e-12, "running_var")


def test_training_without_running_stats_and_without_affine():
    x = torch.randn(8, 3, dtype=torch.float64)
    assert_close(batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True), 1e-12, "y")


def test_eval_allows_eps_zero_like_torch():
    x = torch.randn(4, 2, dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.full((2,), 4.0, dtype=torch.float64)
    assert_close(batch_norm(x, rm, rv, eps=0.0), x / 2, 1e-15, "eval with eps=0")


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4), (2, 3, 2, 3)])
def test_gradcheck_and_gradgradcheck_training(backend, shape):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_gradcheck_and_gradgradcheck_eval(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1
    f = lambda x, w, b: batch_norm(x, rm, rv, w, b, training=False)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch(backend):
    """A gradient penalty (create_graph=True) gives torch.nn's second-order gradients."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    results = []
    for layer in (bnlab.BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        x = x0.clone().requires_grad_()
        y = layer(x)
        (gx,) = torch.autograd.grad((y * torch.sin(x0)).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        results.append((gx.detach(), x.grad, layer.weight.grad))
    for ours, theirs, name in zip(results[0], results[1], ("grad x", "grad of penalty wrt x", "grad of penalty wrt weight")):
        assert_close(ours, theirs, 1e-10, name)


def test_only_some_inputs_need_grad(backend):
    x = torch.randn(5, 3, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    batch_norm(x, None, None, w, b, training=True).pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    F.batch_norm(x, None, None, w2, b, training=True).pow(2).sum().backward()
    assert_close(w.grad, w2.grad, 1e-12, "grad weight when x needs no grad")
