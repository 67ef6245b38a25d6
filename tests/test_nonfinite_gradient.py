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
from bnlab.backends import get_backend
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


def _trained_beside_the_reference(x, dy, memory_format):
    """(layer, x leaf, the float64 reference's (dx, dweight, dbias)) after one training step of a
    BatchNorm2d(3) on x with upstream gradient dy, both in ``memory_format``."""
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    bn = bnlab.BatchNorm2d(3)
    xg = x.clone().requires_grad_(True)
    bn(xg).backward(dy)
    cache = ref.forward_train(x.double().numpy(), bn.weight.detach().double().numpy(), None)[1]
    with np.errstate(invalid="ignore"):
        return bn, xg, ref.backward(dy.double().numpy(), cache)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_an_infinite_dy_gives_the_references_infinity_where_x_is_the_rounded_mean(backend, memory_format):
    """There x - mean_hi is 0, and a·0 with the infinite coefficient a was NaN (about one fuzz case
    in 2,000), where the exact x - mean = -mean_lo gives the float64 reference's -inf: the CPU
    kernels take -mean_lo there (dx_at_rounded_means, after their vector loops, only where a sum
    is not finite); the Triton kernels (test_triton.py) and, since the thirty-sixth session, the
    portable path compute a·((x - mean_hi) + t) with t = -mean_lo in such channels
    (elementwise.rounded_mean_term)."""
    x, dy = at_the_rounded_mean()
    _, xg, (dx, _, _) = _trained_beside_the_reference(x, dy, memory_format)
    at_mean = (x[:, 0] == 1000.0).numpy()
    assert at_mean.sum() == 150 and np.isneginf(dx[:, 0][at_mean]).all()  # the case the test is about
    _placed_as(xg.grad, dx, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(16, 5, 3, 3), (64, 7)], ids=["maps", "dense"])
def test_the_rounded_mean_term_where_it_always_runs_keeps_the_bits_of_finite_gradients(shape, dtype, monkeypatch):
    """Off an eager CPU call (a GPU, a traced graph) the portable input gradient adds t on every
    call, -0 where a is finite: the bits must be those of the call that skips it, signed zeros too
    (x = -0.0 and x = +0.0 in a channel whose mean is 0). And where a is infinite the always-run
    form places ±inf as the skipping one does."""
    from bnlab import elementwise, stats

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 3 + 1e3).to(dtype)
    x[:, 1] = 0.0
    x[::2, 1] = -0.0  # mean 0: mean_hi = mean_lo = 0, x - mean_hi = ±0
    dy = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.rand(shape[1], generator=gen)
    moments = stats.moments(x)
    mean, _, invstd = finalize(moments, 1e-5)
    sums = elementwise.grad_sums(dy, x, mean, invstd)
    count = x.numel() // shape[1]
    skipped = elementwise.grad_input(dy, x, mean, invstd, weight, *sums, count)
    finite_a, lo = torch.tensor([2.0, -3.0], dtype=torch.float64), torch.tensor([1e-5, 0.0], dtype=torch.float64)
    assert elementwise.rounded_mean_term(finite_a, lo, dtype) is None  # eager CPU, a finite: skipped
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    t = elementwise.rounded_mean_term(finite_a.neg().exp().mul(INF), lo, dtype)  # a = +inf: t = -lo
    assert torch.equal(t.double(), (-lo).to(dtype).double()) and torch.signbit(t).all()
    always = elementwise.grad_input(dy, x, mean, invstd, weight, *sums, count)
    assert torch.equal(always.view(-1).view(torch.int8), skipped.view(-1).view(torch.int8))
    dy_inf = dy.clone()
    dy_inf[(3, 0) + (0,) * (len(shape) - 2)] = INF
    sums_inf = elementwise.grad_sums(dy_inf, x, mean, invstd)
    always_inf = elementwise.grad_input(dy_inf, x, mean, invstd, weight, *sums_inf, count)
    monkeypatch.undo()
    skipped_inf = elementwise.grad_input(dy_inf, x, mean, invstd, weight, *sums_inf, count)
    assert torch.equal(torch.isnan(always_inf), torch.isnan(skipped_inf))
    assert torch.equal(always_inf.nan_to_num(0.0).double(), skipped_inf.nan_to_num(0.0).double())


def test_with_a_merged_count_the_portable_input_gradient_adds_the_term_without_reading_the_host(monkeypatch):
    """SyncBatchNorm hands the input gradient the group's count as a tensor: its steps must read
    nothing on the host (a CUDA synchronisation), so the term is added unchecked, and the rounded
    mean still gets the reference's -inf."""
    from bnlab import elementwise, stats

    x, dy = at_the_rounded_mean()
    mean, _, invstd = finalize(stats.moments(x), 1e-5)
    weight = torch.ones(3)
    sum_dy, sum_dy_xhat = elementwise.grad_sums(dy, x, mean, invstd, batch_mean=True)
    count = torch.tensor(float(x.numel() // 3), dtype=torch.float64)

    def no_host_read(*args, **kwargs):
        raise AssertionError("read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    dx = elementwise.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    monkeypatch.undo()
    cache = ref.forward_train(x.double().numpy(), weight.double().numpy(), None)[1]
    with np.errstate(invalid="ignore"):
        want = ref.backward(dy.double().numpy(), cache)[0]
    at_mean = (x[:, 0] == 1000.0).numpy()
    assert np.isneginf(want[:, 0][at_mean]).all() and torch.isneginf(dx[:, 0][torch.from_numpy(at_mean)]).all()
    _placed_as(dx, want, "dx")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_an_infinite_dy_at_the_rounded_mean_gives_the_references_infinite_weight_gradient(backend, memory_format):
    """The infinite dy sits where x equals the rounded mean: Σ(dy - g)·(x - mean_hi) adds inf·0 =
    NaN there, where the exact x - mean = -mean_lo makes Σdy·x̂ the reference's -inf. dweight was
    NaN, and dx NaN across the channel (the portable backend's fuzz campaign, thirty-sixth session;
    the CPU kernels alike): both now recompute the channel's sum from its infinite terms
    (sums_at_rounded_means)."""
    bn, xg, (dx, dw, db) = _trained_beside_the_reference(*at_the_rounded_mean(infinity_at="mean"), memory_format)
    assert np.isneginf(dw[0]) and np.isposinf(db[0])  # the case the test is about
    _placed_as(bn.weight.grad, dw, "dweight")
    _placed_as(bn.bias.grad, db, "dbias")
    _placed_as(xg.grad, dx, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (8, 3, 5, 5), (64, 2, 1, 1)], ids=["two", "maps", "rows"])
def test_finite_data_near_the_float32_limit_gives_the_references_finite_gradients(backend, dtype, memory_format, shape):
    # x up to 3e38 (finite in float32 and bf16): the float32 products dy·(x - hi) and their runs
    # overflowed, and dweight came out ±inf and dx ±inf or NaN where the float64 reference is finite
    # (torch.nn gives NaN). Now such a channel's sums are taken again in float64 (the CPU kernels
    # since the forty-eighth session, the portable backend since the forty-ninth).
    gen = torch.Generator().manual_seed(11)
    x = ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 3e38).to(dtype)
    x.view(-1)[0], x.view(-1)[1] = 3e38, -3e38  # at least one pair at the limit
    dy = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    layer = bnlab.BatchNorm2d(shape[1])
    xg = x.clone().requires_grad_()
    layer(xg).backward(dy)
    _, cache = ref.forward_train(x.double().numpy(), np.ones(shape[1]), np.zeros(shape[1]), layer.eps)
    dx64, dw64, db64 = ref.backward(dy.double().numpy(), cache)
    assert np.isfinite(dw64).all()
    _placed_as(layer.weight.grad, dw64, "dweight")
    _placed_as(layer.bias.grad, db64, "dbias")
    scale = max(1.0, float(np.abs(dx64).max()))  # dx is tiny here (invstd ~ 1e-38): compared to max(1, |dx|)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    np.testing.assert_allclose(xg.grad.double().numpy() / scale, dx64 / scale, atol=tol)
