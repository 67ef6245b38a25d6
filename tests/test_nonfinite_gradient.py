"""An infinite upstream gradient gives ±inf where torch.nn and the float64 reference do, not NaN.

The backward's sums carry float64 remainders: Σdy·x̂ = invstd·(Σdy·(x - mean_hi) - mean_lo·Σdy),
and dx's constant takes -a·mean_lo and the remainder of dy's mean. They correct a finite sum by
less than its last bit; where an infinite dy (an overflowing loss, as under mixed precision)
makes a sum ±inf, a remainder could only add inf - inf = NaN, or 0·inf where mean_lo is 0. So
dweight came out NaN where torch.nn and the reference give ±inf, and dx NaN everywhere in the
channel (benchmarks/fuzz_kernels.py, with infinite upstream gradients, failed 618 cases of 11,000
on this). The remainders are now dropped where they are not finite (finite_or_zero in the CPU
kernels, bnlab.elementwise and the Triton kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.backends import cpu_build, get_backend
from bnlab.stats import finalize, merge_moments
from speed_helpers import at_the_rounded_mean

INF = float("inf")


def _data(shape, seed=0):
    """x normal; dy normal with +inf, +inf and -inf in channels 0, 1 and 2 (float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    rest = (0,) * (len(shape) - 2)
    dy[(3, 0) + rest] = INF
    dy[(5, 1) + rest] = INF
    dy[(7, 2) + rest] = -INF
    return x, dy


def _placed_as(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    """NaN, +inf and -inf where expected has them, and the finite values close."""
    a = actual.detach().double().numpy()
    for name, kind in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        assert np.array_equal(kind(a), kind(expected)), f"{what}: {name} placed unlike the reference"
    finite = np.isfinite(expected)
    np.testing.assert_allclose(a[finite], expected[finite], rtol=2e-4, atol=2e-4, err_msg=what)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(40, 3, 4, 5), (40, 3, 1, 1)], ids=["maps", "1x1"])
def test_training_gradients_with_an_infinite_dy_are_placed_as_the_reference(backend, shape, memory_format):
    x, dy = _data(shape)
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    bn, theirs = bnlab.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for layer in (bn, theirs):
            layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
    xg = x.clone().requires_grad_(True)
    bn(xg).backward(dy)
    cache = ref.forward_train(x.double().numpy(), bn.weight.detach().double().numpy(), None)[1]
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's dx: NaN there, as expected
        dx, dw, db = ref.backward(dy.double().numpy(), cache)
    assert np.isinf(dw).all() and np.isinf(db).all()  # the case the test is about
    _placed_as(bn.weight.grad, dw, "dweight")
    _placed_as(bn.bias.grad, db, "dbias")
    _placed_as(xg.grad, dx, "dx")
    xt = x.clone().requires_grad_(True)
    theirs(xt).backward(dy)  # torch.nn agrees with the reference on the parameter gradients
    assert torch.equal(theirs.weight.grad, bn.weight.grad) and torch.equal(theirs.bias.grad, bn.bias.grad)


def test_frozen_layer_gradients_with_an_infinite_dy_are_placed_as_the_reference(backend):
    """Eval mode with a graph: dx = dy·γ·invstd (±inf where dy is), dweight Σdy·x̂ about the
    running mean, where mean_lo·Σdy was the remainder."""
    x, dy = _data((40, 3, 4, 5), seed=1)
    bn = bnlab.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.3, 0.7]))  # not float32-exact: mean_lo != 0
        bn.running_var.copy_(torch.tensor([0.9, 1.3, 2.1]))
    xg = x.clone().requires_grad_(True)
    bn(xg).backward(dy)
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    invstd = 1 / np.sqrt(var + bn.eps)
    x_hat = (x.double().numpy() - mean[None, :, None, None]) * invstd[None, :, None, None]
    dy64 = dy.double().numpy()
    with np.errstate(invalid="ignore"):
        _placed_as(bn.weight.grad, (dy64 * x_hat).sum(axis=(0, 2, 3)), "dweight")
        _placed_as(xg.grad, dy64 * invstd[None, :, None, None], "dx")


@pytest.mark.parametrize("name", ["cpu", "portable"])
def test_sync_ranks_with_an_infinite_dy_give_the_references_infinity(name):
    """SyncBatchNorm's shares (bnlab.sync_steps.local_grad_sums): the moved term (rank mean - group
    mean)·Σdy, infinite with Σdy, is dropped as the kernels' remainders are, so the rank's sum
    keeps the sign of its infinite product. (Only where the infinite dy's x lies between the rank's
    mean and the group's do the two differ: docs/math.md §4.2.)"""
    from bnlab.sync_steps import local_grad_sums

    impl = get_backend(name)
    x, dy = _data((40, 3, 5), seed=2)
    x[3, 0, 0], x[5, 1, 0], x[7, 2, 0] = 3.0, -3.0, 3.0  # far on one side of both means
    parts = [(x[:20], dy[:20]), (x[20:], dy[20:])]
    local = [impl.moments(xr) for xr, _ in parts]
    stats = merge_moments(local)
    _, _, invstd = finalize(stats, 1e-5)
    got = sum(local_grad_sums(d, xr, own.mean, stats.mean, invstd, impl)[1] for (xr, d), own in zip(parts, local))
    x_hat = (x.double() - stats.mean.view(1, -1, 1)) * invstd.view(1, -1, 1)
    with np.errstate(invalid="ignore"):
        _placed_as(got, (dy.double() * x_hat).sum((0, 2)).numpy(), "Σdy·x̂")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_an_infinite_dy_gives_the_references_infinity_where_x_is_the_rounded_mean(memory_format):
    """There x - mean_hi is 0, and a·0 with the infinite coefficient a was NaN (about one fuzz case
    in 2,000), where the exact x - mean = -mean_lo gives the float64 reference's -inf: the CPU
    kernels now take -mean_lo there (dx_at_rounded_means, after their vector loops, only where a
    sum is not finite); the Triton kernels too (test_triton.py). The portable path keeps the NaN
    (docs/math.md §4.2): a select in every call cost the portable backward 1.5-3.3x."""
    if "cpu" not in bnlab.available_backends() or cpu_build.load() is None:
        pytest.skip("the CPU kernels did not build")
    x, dy = at_the_rounded_mean()
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    bn = bnlab.BatchNorm2d(3)
    xg = x.clone().requires_grad_(True)
    bnlab.set_backend("cpu")
    try:
        bn(xg).backward(dy)
    finally:
        bnlab.set_backend(None)
    cache = ref.forward_train(x.double().numpy(), bn.weight.detach().double().numpy(), None)[1]
    with np.errstate(invalid="ignore"):
        dx = ref.backward(dy.double().numpy(), cache)[0]
    at_mean = (x[:, 0] == 1000.0).numpy()
    assert at_mean.sum() == 150 and np.isneginf(dx[:, 0][at_mean]).all()  # the case the test is about
    _placed_as(xg.grad, dx, "dx")
