"""The float64 NumPy reference against outside oracles: finite differences and torch.nn in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab import reference as ref
from conftest import assert_close

SHAPES = [(7, 5), (4, 3, 11), (3, 2, 5, 7), (2, 3, 2, 3, 5), (1, 4, 6)]


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(2.0, 3.0, size=shape)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    dy = rng.normal(size=shape)  # non-uniform upstream gradient: a uniform one hides errors in dx
    return x, gamma, beta, dy


def _finite_difference(f, arr, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of arr (modified in place)."""
    grad = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i]
        arr[i] = old + h
        up = f()
        arr[i] = old - h
        down = f()
        arr[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_both_backward_forms_equal_finite_differences(shape):
    x, gamma, beta, dy = _data(shape)
    loss = lambda: float((ref.forward_train(x, gamma, beta)[0] * dy).sum())
    _, cache = ref.forward_train(x, gamma, beta)
    graph = ref.backward_graph(dy, cache)
    dx, dgamma, dbeta = ref.backward(dy, cache)
    fd_x = _finite_difference(loss, x)
    fd_gamma = _finite_difference(loss, gamma)
    fd_beta = _finite_difference(loss, beta)
    for name, value, fd in (("dx", dx, fd_x), ("dgamma", dgamma, fd_gamma), ("dbeta", dbeta, fd_beta)):
        assert_close(value, fd, 1e-6, f"closed form {name}")
        assert_close(graph[name], fd, 1e-6, f"graph form {name}")
    assert np.abs(dx).max() > 1e-3, "gradient too small for the comparison to mean anything"


@pytest.mark.parametrize("shape", SHAPES)
def test_graph_intermediates_are_the_seed_formulas(shape):
    """∂ℓ/∂σ² and ∂ℓ/∂μ are what the seed says, checked by perturbing σ² and μ inside the forward."""
    x, gamma, beta, dy = _data(shape, seed=1)
    _, cache = ref.forward_train(x, gamma, beta)
    graph = ref.backward_graph(dy, cache)
    axes = ref.reduce_axes(x)
    shape_c = (1, -1) + (1,) * (x.ndim - 2)
    eps = cache.eps

    def loss_given(mean, var):
        x_hat = (x - mean.reshape(shape_c)) / np.sqrt(var.reshape(shape_c) + eps)
        return float(((gamma.reshape(shape_c) * x_hat + beta.reshape(shape_c)) * dy).sum())

    mean, var = cache.mean.copy(), cache.var.copy()
    fd_var = _finite_difference(lambda: loss_given(mean, var), var)
    fd_mean = _finite_difference(lambda: loss_given(mean, var), mean)
    assert_close(graph["dvar"], fd_var, 1e-6, "dvar")
    assert_close(graph["dmean"], fd_mean, 1e-6, "dmean (direct path)")
    assert_close(graph["dx_hat"], dy * gamma.reshape(shape_c), 1e-12, "dx_hat")
    assert np.allclose((x - cache.mean.reshape(shape_c)).sum(axis=axes), 0.0, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_torch_float64(shape):
    x, gamma, beta, dy = _data(shape, seed=2)
    layer = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[len(shape)]
    bn = layer(shape[1], dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = bn(xt)
    yt.backward(torch.from_numpy(dy))
    y, cache = ref.forward_train(x, gamma, beta, eps=bn.eps)
    dx, dgamma, dbeta = ref.backward(dy, cache)
    assert_close(y, yt, 1e-12, "y")
    assert_close(dx, xt.grad, 1e-12, "dx")
    assert_close(dgamma, bn.weight.grad, 1e-12, "dgamma")
    assert_close(dbeta, bn.bias.grad, 1e-12, "dbeta")
    rm, rv, n = ref.update_running_stats(np.zeros(shape[1]), np.ones(shape[1]), ref.moments(x), 0.1, 0)
    assert_close(rm, bn.running_mean, 1e-12, "running_mean")
    assert_close(rv, bn.running_var, 1e-12, "running_var")
    assert n == int(bn.num_batches_tracked) == 1
    bn.eval()
    assert_close(ref.forward_eval(x, rm, rv, gamma, beta, bn.eps), bn(torch.from_numpy(x)), 1e-12, "eval y")


def test_cumulative_average_matches_torch_momentum_none():
    rng = np.random.default_rng(3)
    bn = torch.nn.BatchNorm1d(4, momentum=None, dtype=torch.float64)
    rm, rv, n = np.zeros(4), np.ones(4), 0
    for step in range(4):
        x = rng.normal(step, 1 + step, size=(6, 4))
        bn(torch.from_numpy(x))
        rm, rv, n = ref.update_running_stats(rm, rv, ref.moments(x), None, n)
    assert_close(rm, bn.running_mean, 1e-12, "running_mean")
    assert_close(rv, bn.running_var, 1e-12, "running_var")
    assert n == 4


def test_merge_moments_equals_whole_batch_with_empty_and_uneven_pieces():
    rng = np.random.default_rng(4)
    x = rng.normal(5.0, 2.0, size=(11, 3, 4))
    pieces = [x[:3], x[3:3], x[3:4], x[4:11]]
    merged = ref.merge_moments([ref.moments(p) for p in pieces])
    whole = ref.moments(x)
    assert merged.count == whole.count == 44
    assert_close(merged.mean, whole.mean, 1e-13, "mean")
    assert_close(merged.m2, whole.m2, 1e-12, "m2")
    with pytest.raises(ValueError, match="parts"):
        ref.merge_moments([])


def test_momentum_decay_conversion():
    assert ref.decay_to_momentum(0.9) == pytest.approx(0.1)
    assert ref.momentum_to_decay(0.01) == pytest.approx(0.99)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ref.decay_to_momentum(bad)
        with pytest.raises(ValueError, match="momentum"):
            ref.momentum_to_decay(bad)
    # not numbers: named (a string and None had given Python's comparison error, True passed as 1)
    for bad, shown in (("0.9", "str '0.9'"), (None, "NoneType None"), (True, "bool True")):
        with pytest.raises(TypeError, match=f"decay: expected a number in \\[0, 1\\], got {shown}"):
            ref.decay_to_momentum(bad)
        with pytest.raises(TypeError, match=f"momentum: expected a number in \\[0, 1\\], got {shown}"):
            ref.momentum_to_decay(bad)


def test_rank_one_input_is_rejected():
    with pytest.raises(ValueError, match="rank >= 2"):
        ref.moments(np.zeros(5))
