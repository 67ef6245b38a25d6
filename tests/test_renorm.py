"""Batch Renormalization against Ioffe (2017)'s formulas in float64, with r and d constant in the backward."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.variants import reference as vref
from bnlab.variants.renorm import renorm_limits
from features_util import assert_close, assert_train_steps_match, to_np


def _layer(c, dtype=torch.float64, cls=bnlab.BatchNorm1d, affine=True, **options):
    torch.manual_seed(2)
    layer = cls(c, dtype=dtype, affine=affine, renorm=True, **options)
    with torch.no_grad():
        if affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.2, 3.0)
    return layer


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, rmax, dmax", [((7, 4, 5), 1.5, 0.3), ((6, 3), 3.0, 5.0), ((4, 3, 3, 3), 1.2, 0.0)])
def test_matches_the_papers_forward_and_backward(shape, rmax, dmax, affine):
    cls = bnlab.BatchNorm2d if len(shape) == 4 else bnlab.BatchNorm1d
    layer = _layer(shape[1], cls=cls, affine=affine, rmax=rmax, dmax=dmax)
    running_mean, running_var = to_np(layer.running_mean), to_np(layer.running_var)
    x = (torch.randn(shape, dtype=torch.float64) * 1.7 + 0.4).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    gamma = to_np(layer.weight) if affine else None
    beta = to_np(layer.bias) if affine else None
    y_ref, cache = vref.renorm_forward_train(to_np(x), gamma, beta, running_mean, running_var, layer.eps, rmax, dmax)
    dx_ref, dgamma_ref, dbeta_ref = vref.renorm_backward(to_np(dy), cache)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(x.grad, dx_ref, 1e-10, "dx")
    if affine:
        assert_close(layer.weight.grad, dgamma_ref, 1e-10, "dgamma")
        assert_close(layer.bias.grad, dbeta_ref, 1e-10, "dbeta")
    # The running averages move as for plain BN (torch's convention).
    mean, var, _ = ref.update_running_stats(running_mean, running_var, ref.moments(to_np(x)), 0.1)
    assert_close(layer.running_mean, mean, 1e-12, "running_mean")
    assert_close(layer.running_var, var, 1e-12, "running_var")


def test_the_case_is_not_trivial():
    """The shapes above do clip: r and d differ from (1, 0), so renorm differs from plain BN there."""
    layer = _layer(4, rmax=1.5, dmax=0.3)
    x = torch.randn(7, 4, 5, dtype=torch.float64) * 1.7 + 0.4
    _, cache = vref.renorm_forward_train(to_np(x), None, None, to_np(layer.running_mean), to_np(layer.running_var))
    assert np.abs(cache["d"]).max() > 0.1 and np.abs(cache["r"] - 1).max() > 0.1
    plain = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
    assert (layer(x) - plain).abs().max() > 1e-2


def test_gradient_is_the_finite_difference_with_r_and_d_frozen():
    """The paper's stop_gradient: our dx is the exact derivative of x ↦ γ·(r₀·x̂_B(x) + d₀) + β at x₀."""
    layer = _layer(3, rmax=1.4, dmax=0.2)
    x0 = torch.randn(6, 3, 4, dtype=torch.float64) * 1.5 + 0.7
    _, cache = vref.renorm_forward_train(
        to_np(x0), to_np(layer.weight), to_np(layer.bias), to_np(layer.running_mean), to_np(layer.running_var), layer.eps, 1.4, 0.2
    )
    r0, d0 = torch.from_numpy(cache["r"]).view(1, -1, 1), torch.from_numpy(cache["d"]).view(1, -1, 1)
    gamma, beta = layer.weight.detach().view(1, -1, 1), layer.bias.detach().view(1, -1, 1)

    def frozen(x):
        x_hat = torch.nn.functional.batch_norm(x, None, None, None, None, True, eps=layer.eps)
        return gamma * (r0 * x_hat + d0) + beta

    dy = torch.randn_like(x0)
    x = x0.clone().requires_grad_()
    layer(x).backward(dy)
    # Central differences of <dy, frozen(x)> along random directions.
    for _ in range(3):
        v = torch.randn_like(x0)
        h = 1e-6
        fd = ((dy * frozen(x0 + h * v)).sum() - (dy * frozen(x0 - h * v)).sum()) / (2 * h)
        assert abs(float(fd) - float((x.grad * v).sum())) < 1e-6 * max(1.0, abs(float(fd)))


def test_rmax_1_dmax_0_is_plain_bn():
    torch.manual_seed(3)
    ours = bnlab.BatchNorm2d(3, renorm=True, rmax=1.0, dmax=0.0)
    theirs = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.running_mean.fill_(5.0)  # far from the data: renorm would correct a lot if allowed
            layer.running_var.fill_(9.0)
    batches = []
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 - 1
        batches.append((x, torch.randn_like(x)))
    assert_train_steps_match(ours, theirs, batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmax_1_dmax_0_gives_plain_bnlab_bns_bits(backend, dtype):
    # "rmax=1, dmax=0 is plain BN exactly" (docs/features.md): the outputs, gradients and running
    # averages, bit for bit; in float64 the CPU kernels' running averages were an ulp off (their
    # update fused a product into the sum, the renorm path's torch ops do not)
    torch.manual_seed(5)
    ours = bnlab.BatchNorm2d(3, renorm=True, rmax=1.0, dmax=0.0, dtype=dtype)
    plain = bnlab.BatchNorm2d(3, dtype=dtype)
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5, dtype=dtype) * 3 + 2
        dy = torch.randn_like(x)
        grads = []
        for layer in (ours, plain):
            xg = x.clone().requires_grad_()
            y = layer(xg)
            y.backward(dy)
            grads.append((y, xg.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_eval_mode_is_plain_bn_with_the_running_statistics():
    layer = _layer(3, dtype=torch.float32, rmax=2.0, dmax=1.0)
    plain = torch.nn.BatchNorm1d(3)
    plain.load_state_dict(layer.state_dict())
    layer.eval()
    plain.eval()
    x = torch.randn(5, 3)
    assert_close(layer(x), plain(x), 2e-6, "eval")


def test_ramp_schedule_relaxes_the_limits_linearly():
    for step, expected in [(0, (1.0, 0.0)), (10, (1.0, 0.0)), (15, (2.0, 2.5)), (20, (3.0, 5.0)), (99, (3.0, 5.0))]:
        rmax, dmax = renorm_limits(torch.tensor(step), 3.0, 5.0, (10, 20))
        assert abs(float(rmax) - expected[0]) < 1e-12 and abs(float(dmax) - expected[1]) < 1e-12, step


def test_ramp_starts_as_plain_bn_and_reaches_the_full_limits():
    layer = _layer(3, rmax=1.5, dmax=0.5, renorm_ramp=(2, 4))
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 3  # far from the running statistics
    plain = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, eps=layer.eps)
    assert_close(layer(x), plain, 1e-10, "step 0: rmax=1, dmax=0")
    layer.num_batches_tracked.fill_(3)  # half-way: rmax 1.25, dmax 0.25
    rm, rv = to_np(layer.running_mean), to_np(layer.running_var)
    y_ref, _ = vref.renorm_forward_train(to_np(x), to_np(layer.weight), to_np(layer.bias), rm, rv, layer.eps, 1.25, 0.25)
    assert_close(layer(x), y_ref, 1e-10, "step 3")
    layer.num_batches_tracked.fill_(40)
    rm, rv = to_np(layer.running_mean), to_np(layer.running_var)
    y_ref, _ = vref.renorm_forward_train(to_np(x), to_np(layer.weight), to_np(layer.bias), rm, rv, layer.eps, 1.5, 0.5)
    assert_close(layer(x), y_ref, 1e-10, "after the ramp")


def test_ghost_batches_are_renormalized_one_by_one():
    layer = _layer(3, rmax=1.3, dmax=0.4, virtual_batch_size=3)
    rm, rv = to_np(layer.running_mean), to_np(layer.running_var)
    x = torch.randn(8, 3, 2, dtype=torch.float64) * 1.5 + 0.5
    y = layer(x)
    parts = [
        vref.renorm_forward_train(to_np(x[i : i + 3]), to_np(layer.weight), to_np(layer.bias), rm, rv, layer.eps, 1.3, 0.4)[0]
        for i in range(0, 8, 3)
    ]
    assert_close(y, np.concatenate(parts), 1e-10, "ghost + renorm")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rmax": 0.5}, "rmax"),
        ({"dmax": -1.0}, "dmax"),
        ({"rmax": float("inf")}, "rmax"),
        ({"renorm_ramp": (5, 5)}, "renorm_ramp"),
        ({"renorm_ramp": (1,)}, "renorm_ramp"),
        ({"track_running_stats": False}, "renorm"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bnlab.BatchNorm1d(3, renorm=True, **kwargs)


@pytest.mark.parametrize("kwargs", [{"rmax": 2.0}, {"dmax": 1.0}, {"renorm_ramp": (1, 5)}])
def test_renorm_options_without_renorm_are_refused_by_name(kwargs):
    # they had been kept silently, doing nothing, and hidden from the layer's repr
    [(name, value)] = kwargs.items()
    with pytest.raises(ValueError, match=re.escape(f"{name}: an option of Batch Renormalization, used only with "
                                                   f"renorm=True; got {name}={value!r} with renorm=False")):
        bnlab.BatchNorm2d(3, **kwargs)


def test_gradcheck_and_gradgradcheck_where_the_clipping_saturates():
    """With r and d clipped at their limits they are locally constant, so the stop-gradient derivative
    is the true one and torch's numerical checks apply (first and second order)."""
    layer = _layer(3, rmax=1.2, dmax=0.1)
    with torch.no_grad():
        layer.running_mean.fill_(10.0)  # d = -dmax
        layer.running_var.fill_(100.0)  # σ_B/σ ≈ 0.1: r = 1/rmax
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    layer.momentum = 0.0  # keep the running statistics where they are across the checks' calls
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_inputs_follow_the_reference(dtype, tol):
    layer = _layer(3, dtype=torch.float32, rmax=1.5, dmax=0.3)
    rm, rv = to_np(layer.running_mean), to_np(layer.running_var)
    x = (torch.randn(6, 3, 4) * 1.5 + 0.4).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y_ref, _ = vref.renorm_forward_train(to_np(x), to_np(layer.weight), to_np(layer.bias), rm, rv, layer.eps, 1.5, 0.3)
    assert_close(y, y_ref, tol, f"{dtype}")
