"""The training backward sums Σdy·x̂ with dy's shift taken off first (docs/math.md §4.2).

Where the mean is x's own batch mean, Σ(x - mean) = 0, so Σdy·(x - mean) = Σ(dy - g)·(x - mean)
for any per-channel g: the backends then sum (dy - g)·(x - hi) (``batch_mean=True``). Where dy has a
large common part (dy = 8 + 0.01·noise, its mean 800 times its spread), the float32 products
dy·(x - hi) carry rounding errors ~800 times larger, and Σdy·x̂ (then dx) lost about 8 bits.

The identity holds only as far as the batch mean is exact: its own rounding δ adds δ·Σ(dy - g). So
g is near dy's mean where dy has a large common part and 0 where it has none (centre_shift, from 16
values in four places of the channel); with g a channel's first value, zero-mean dy had lost up to 25x in
float32 and 500x in float64 (fuzz_kernels.py found the float64 case).

The oracle is the exact sum (long double) over the exact batch mean. The shapes reach each walk of
the CPU kernels (as tests/test_grad_input_constant_channels.py lists them); the portable path is
checked alongside, and through the modules, dx against the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab import elementwise, reference
from bnlab.backends import get_backend
from bnlab.stats import finalize, merge_moments
from speed_helpers import make_input
from test_grad_input_constant_channels import SHAPES

CPU = get_backend("cpu")


def _gradient(shape, layout, dtype, kind="offset", x_offset=0.0):
    """x normal (plus x_offset), dy of the given kind, both rounded to dtype, in the given layout:
    offset: 8 + 0.01·normal; zero-mean: normal; per-sample: each sample its own offset (normal,
    zero mean over the batch) plus 0.01·normal, as per-sample loss weights make."""
    x = (x_offset + 0.01 ** (x_offset != 0) * make_input(shape, layout, torch.float64, seed=1)).to(dtype)
    noise = make_input(shape, layout, torch.float64, seed=2)
    if kind == "offset":
        dy = 8 + 0.01 * noise
    elif kind == "zero-mean":
        dy = noise
    else:
        gen = torch.Generator().manual_seed(3)
        offsets = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64)
        dy = offsets + 0.01 * noise
    return x, dy.to(dtype)


def _errors(sums_of, x, dy, mean, invstd):
    """max |Σdy·x̂ - exact| over the channels, relative to the size of the centred terms
    sqrt(Σ((dy - mean(dy))·x̂)²), for batch_mean True and False; exact: in long double over the
    exact batch mean (a float64 mean of 1e3 ± 0.01 is itself off by 5.7e-12 of its spread)."""
    dims = tuple([0] + list(range(2, x.dim())))
    xd, dyd = (t.double().numpy().astype(np.longdouble) for t in (x, dy))
    x_hat = (xd - xd.mean(dims, keepdims=True)) * invstd.double().numpy().reshape((1, -1) + (1,) * (x.dim() - 2))
    exact = (dyd * x_hat).sum(dims)
    scale = np.sqrt((((dyd - dyd.mean(dims, keepdims=True)) * x_hat) ** 2).sum(dims))
    return [float((abs(sums_of(bm)[1].numpy().astype(np.longdouble) - exact) / scale).max()) for bm in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_centred_sums_keep_their_digits_where_dy_has_a_large_common_part(shape, layout, dtype):
    x, dy = _gradient(shape, layout, dtype)
    _, stats, invstd = CPU.forward_train(x, None, None, 1e-5)
    for name, sums_of in (
        ("cpu", lambda bm: CPU.grad_sums(dy, x, stats.mean, invstd, bm)),
        ("portable", lambda bm: elementwise.grad_sums(dy, x, stats.mean, invstd, bm)),
    ):
        centred, whole = _errors(sums_of, x, dy, stats.mean, invstd)
        # centred: float32 rounding of the centred terms (1e-7 to 9e-6 measured); whole dy: 2e-4
        # to 2e-3, also carrying the mean's own float64 error times 8·m
        assert centred < 2e-5, f"{name}: centred Σdy·x̂ off by {centred:.2e} of its terms"
        assert centred * 20 < whole, f"{name}: centred {centred:.2e} against whole-dy {whole:.2e}"


@pytest.mark.parametrize("x_offset", [0.0, 1e3], ids=["x normal", "x 1e3 ± 0.01"])
@pytest.mark.parametrize("kind", ["zero-mean", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,layout", [((220, 9, 588), "nchw"), ((64, 24, 2, 2), "nchw"), ((64, 40, 3, 3), "cl"),
                                          ((4100, 10), "nchw")])  # fmt: skip
def test_centring_costs_nothing_where_dy_has_no_common_part(shape, layout, dtype, kind, x_offset):
    """Without a common part g = 0 and the centred sums are the whole ones: no worse than them
    (the first dy value as g had made these up to 25x (float32) and 500x (float64) worse)."""
    x, dy = _gradient(shape, layout, dtype, kind, x_offset)
    _, stats, invstd = CPU.forward_train(x, None, None, 1e-5)
    for name, sums_of in (
        ("cpu", lambda bm: CPU.grad_sums(dy, x, stats.mean, invstd, bm)),
        ("portable", lambda bm: elementwise.grad_sums(dy, x, stats.mean, invstd, bm)),
    ):
        centred, whole = _errors(sums_of, x, dy, stats.mean, invstd)
        floor = 1e-6 if dtype == torch.float32 else 1e-14
        assert centred <= 1.5 * whole + floor, f"{name}: centred {centred:.2e} against whole-dy {whole:.2e}"


def test_centre_shift_takes_the_common_part_only():
    """g: the value of a constant channel exactly, near the mean of an offset one, 0 for zero-mean
    dy, for per-sample offsets, and where the sample holds no finite value."""
    gen = torch.Generator().manual_seed(9)
    dy = torch.randn(32, 5, 7, generator=gen, dtype=torch.float64)
    dy[:, 0] = 0.1  # constant
    dy[:, 1] = 8 + 0.01 * dy[:, 1]  # a large common part
    dy[:, 3] = torch.randn(32, 1, generator=gen, dtype=torch.float64) + 0.01 * dy[:, 3]  # per-sample offsets
    dy[:, 4] = float("nan")
    g = elementwise.centre_shift(dy)
    assert g[0] == 0.1 and abs(float(g[1]) - 8) < 0.01
    assert g[2] == 0 and g[3] == 0 and g[4] == 0


@pytest.mark.parametrize(
    "layer,shape,memory_format",
    [
        (bnlab.BatchNorm2d, (16, 8, 9, 9), torch.contiguous_format),
        (bnlab.BatchNorm2d, (16, 8, 9, 9), torch.channels_last),
        (bnlab.BatchNorm2d, (4, 32, 14, 14), torch.contiguous_format),
        (bnlab.BatchNorm1d, (256, 100), torch.contiguous_format),
    ],
)
def test_module_training_backward_is_centred(layer, shape, memory_format):
    """Through the modules (the compiled entry where it is set up, else the autograd function): dx
    within a few float32 units of the float64 reference where dy = 8 + 0.01·noise (1.5e-5 of its
    size before the centred sums; torch.nn 1e-5 to 7e-5)."""
    x, dy = _gradient(shape, "nchw", torch.float32)
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    bn = layer(shape[1])
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
    xg = x.clone().requires_grad_(True)
    bn(xg).backward(dy)
    cache = reference.forward_train(x.double().numpy(), bn.weight.detach().double().numpy(), None)[1]
    exact = torch.as_tensor(reference.backward(dy.double().numpy(), cache)[0])
    error = float((xg.grad.double() - exact).abs().max() / exact.abs().max())
    assert error < 3e-7, f"dx off by {error:.2e} of its size"


def _rank_parts(x, dy, sizes):
    """(x, dy) of each rank: consecutive slices of the batch of the given sizes (0 allowed)."""
    bounds = np.cumsum([0] + list(sizes))
    return [(x[lo:hi], dy[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _synced_errors(impl, x, dy, sizes):
    """(centred, whole) errors of the ranks' summed Σdy·x̂ (as _errors) for x split over ranks of
    the given sizes; the group's statistics merged from the ranks' as SyncBatchNorm merges them."""
    from bnlab.sync_steps import local_grad_sums

    parts = _rank_parts(x, dy, sizes)
    local = [impl.moments(xr) for xr, _ in parts]
    stats = merge_moments(local)
    _, _, invstd = finalize(stats, 1e-5)

    def sums_of(batch_mean):
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for (xr, dyr), own in zip(parts, local):
            if batch_mean:  # now: about the rank's own mean, moved in float64
                total += local_grad_sums(dyr, xr, own.mean, stats.mean, invstd, impl)[1]
            else:  # before: whole dy about the group's mean
                total += impl.grad_sums(dyr, xr, stats.mean, invstd)[1]
        return None, total

    return _errors(sums_of, x, dy, stats.mean, invstd)


@pytest.mark.parametrize("backend", ["cpu", "portable"])
@pytest.mark.parametrize("x_offset", [0.0, 1e3], ids=["x normal", "x 1e3 ± 0.01"])
@pytest.mark.parametrize("shape,layout", [((96, 8, 10, 10), "nchw"), ((96, 40, 3, 3), "cl"), ((4100, 10), "nchw")])
def test_sync_ranks_sum_about_their_own_mean(shape, layout, x_offset, backend):
    """SyncBatchNorm: each rank sums Σdy·(x - its own mean), centred, and moves it to the group's
    mean in float64 (sync_steps.local_grad_sums); the ranks' shares add up to the group's Σdy·x̂
    with the digits single-process training keeps (the rounding of each rank's mean cancels, the
    group's mean being their weighted mean). Summed whole about the group's mean, as before,
    dy = 8 + 0.01·noise lost them (6e-5 to 1e-3 of the terms). One rank holds no rows."""
    x, dy = _gradient(shape, layout, torch.float32, x_offset=x_offset)
    n = shape[0]
    centred, whole = _synced_errors(get_backend(backend), x, dy, [n // 3, 0, n // 2, n - n // 3 - n // 2])
    assert centred < 2e-5, f"ranks' Σdy·x̂ off by {centred:.2e} of its terms"
    assert centred * 20 < whole, f"centred {centred:.2e} against whole-dy {whole:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["zero-mean", "per-sample"])
@pytest.mark.parametrize("shape,layout,sizes", [((4, 64, 28, 28), "nchw", [1, 1, 1, 1]),
                                                ((8, 8, 30, 30), "nchw", [2, 2, 2, 2]),
                                                ((8, 32, 28, 28), "cl", [1, 0, 3, 4])])  # fmt: skip
def test_sync_ranks_without_a_common_part_keep_float_rounding(shape, layout, sizes, kind, dtype):
    """Where a rank's dy has a common part of its own (per-sample offsets, a rank of one or two
    samples), the rounding of that rank's mean no longer cancels: it adds about m_r·δ_r·(g_r -
    the group's mean of dy), the size of the products' own rounding. Measured up to 7x the whole
    sums' error in float32 (1.4e-6 against 1.9e-7 of the terms) and 20x in float64 (1e-14): still
    a few roundings, bounded here; a wrong move (another mean, a lost term) is off by far more."""
    x, dy = _gradient(shape, layout, dtype, kind)
    centred, whole = _synced_errors(CPU, x, dy, sizes)
    floor = 1e-6 if dtype == torch.float32 else 1e-14
    assert centred <= 10 * whole + floor, f"centred {centred:.2e} against whole-dy {whole:.2e}"


@pytest.mark.parametrize("backend", ["cpu", "portable"])
def test_an_empty_rank_adds_nothing(backend):
    """A rank with no rows: Σdy = Σdy·x̂ = 0, even where the group's mean is not finite."""
    from bnlab.sync_steps import local_grad_sums

    impl = get_backend(backend)
    x = torch.empty(0, 3, 4)
    mean = torch.tensor([float("inf"), float("nan"), 1.0], dtype=torch.float64)
    sum_dy, sum_dy_xhat = local_grad_sums(x, x, impl.moments(x).mean, mean, torch.ones(3, dtype=torch.float64), impl)
    assert torch.equal(sum_dy, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(sum_dy_xhat, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("shape,layout", [((96, 8, 10, 10), "nchw"), ((4100, 10), "nchw")])
def test_batch_renorm_backward_is_centred_and_masked_backward_is_not(shape, layout):
    """The backward of normalization with given statistics (Batch Renorm, masked BN): without a
    mask the mean is x's own, so Σdy·x̂ is centred; with one, the sums run over positions the mean
    was not taken over, so dy stays whole (the same bits as batch_mean=False)."""
    from bnlab.variants.batch_stats import batch_stats_backward

    x, dy = _gradient(shape, layout, torch.float32)
    _, stats, invstd = CPU.forward_train(x, None, None, 1e-5)

    def sums_of(batch_mean):
        if batch_mean:
            _, sum_dy_xhat, sum_dy = batch_stats_backward(dy, x, None, stats.mean, invstd, stats.count, None, CPU, False)
            return sum_dy, sum_dy_xhat
        return CPU.grad_sums(dy, x, stats.mean, invstd)

    centred, whole = _errors(sums_of, x, dy, stats.mean, invstd)
    assert centred < 2e-5 and centred * 20 < whole, f"centred {centred:.2e} against whole-dy {whole:.2e}"
    mask = torch.ones((shape[0],) + shape[2:], dtype=torch.bool)
    mask[::3] = False
    masked = batch_stats_backward(dy, x, None, stats.mean, invstd, stats.count, mask, CPU, False)
    expected = CPU.grad_sums(dy, x, stats.mean, invstd)
    assert torch.equal(masked[1], expected[1]) and torch.equal(masked[2], expected[0])
