"""DEVELOPERS.md's precision rules on every code path of the CPU kernels.

Each case compares with the float64 reference on the same (already rounded) input; the paths:
NCL per-channel tasks, NCL waves (few channels, two threads), NCL long rows, NLC, channels outermost.
"""

from __future__ import annotations

import pytest
import torch

from bnlab import reference as ref
from bnlab.backends import get_backend
from speed_helpers import assert_close, make_input, np64, rel_err

CPU = get_backend("cpu")
PATHS = [
    ((16, 8, 9, 9), "nchw"),  # per-channel tasks
    ((96, 3, 16, 16), "nchw"),  # waves: 3 channels, 73k values (two threads)
    ((2, 3, 5003), "nchw"),  # rows cut in segments
    ((40, 5, 3, 3), "cl"),  # NLC
    ((257, 6), "nchw"),  # NLC (2D)
    ((4100, 10), "nchw"),  # NLC, two threads, blocks up to kBlockRows rows
    ((200, 300), "cf"),  # channels outermost (run as NCL), two threads
]


@pytest.mark.parametrize("shape,layout", PATHS)
def test_large_mean_small_std_float32(shape, layout):
    x = make_input(shape, layout, torch.float32, seed=0, mean=1000.0, std=0.01)
    dy = make_input(shape, layout, torch.float32, seed=1)
    y, stats, invstd = CPU.forward_train(x, None, None, 1e-5)
    dx, _, _ = CPU.backward(dy, x, stats.mean, invstd, None, stats.count, True)
    expected, cache = ref.forward_train(np64(x))
    assert_close(y, expected, 2e-4, "output at 1e3 ± 0.01")
    assert_close(dx, ref.backward(np64(dy), cache)[0], 2e-4, "grad at 1e3 ± 0.01")
    assert_close(stats.m2 / stats.count / torch.as_tensor(cache.var), torch.ones(shape[1]), 1e-6, "variance relative to the truth")
    # Control: the textbook one-pass variance in fp32 has no correct digit here.
    dims = [0] + list(range(2, x.dim()))
    naive = (x * x).mean(dims) - x.mean(dims) ** 2
    assert rel_err(naive / torch.as_tensor(cache.var), torch.ones(shape[1])) > 1e-2


@pytest.mark.parametrize("shape,layout", PATHS)
def test_values_near_1e18_stay_finite(shape, layout):
    x = make_input(shape, layout, torch.float32, seed=2, mean=1e18, std=3e17)
    y, stats, _ = CPU.forward_train(x, None, None, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(stats.m2).all()
    assert_close(y, ref.forward_train(np64(x))[0], 2e-4, "output near 1e18")


@pytest.mark.parametrize("shape,layout", PATHS)
def test_nan_in_one_channel_stays_in_that_channel(shape, layout):
    x = make_input(shape, layout, torch.float32, seed=3)
    index = (shape[0] // 2, 1) + tuple(s // 2 for s in shape[2:])
    x[index] = float("nan")
    dy = make_input(shape, layout, torch.float32, seed=4)
    y, stats, invstd = CPU.forward_train(x, None, None, 1e-5)
    dx, dw, db = CPU.backward(dy, x, stats.mean, invstd, None, stats.count, True)
    clean = [c for c in range(shape[1]) if c != 1]
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, clean]).all()
    assert torch.isfinite(dx[:, clean]).all() and torch.isfinite(dw[clean]).all()
    assert_close(y[:, clean], ref.forward_train(np64(x[:, clean]))[0], 2e-4, "channels without NaN")


@pytest.mark.parametrize("shape,layout", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_constant_channel_gives_exactly_beta(shape, layout, dtype):
    x = make_input(shape, layout, dtype, seed=5)
    x[:, 1] = 123.456
    beta = torch.full((shape[1],), 0.25, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    dy = make_input(shape, layout, dtype, seed=6)
    y, stats, invstd = CPU.forward_train(x, None, beta, 1e-5)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], 0.25)), "a constant channel must give exactly beta"
    assert float(stats.m2[1]) == 0.0 and float(stats.mean[1]) == float(x[0, 1].flatten()[0])
    dx, _, _ = CPU.backward(dy, x, stats.mean, invstd, None, stats.count, True)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bfloat16_near_1e18_keeps_finite_statistics(layout):
    """bf16 shares float32's range: squares near 1e36 would overflow float32 sums. NCL chunks sum in
    float64; channels-last runs of rows sum in float32 and are summed again in float64 where that
    overflows."""
    x = make_input((64, 3, 5, 5), layout, torch.bfloat16, seed=7, mean=2e18, std=1e18)
    y, stats, _ = CPU.forward_train(x, None, None, 1e-5)
    assert torch.isfinite(stats.m2).all() and torch.isfinite(y).all()
    assert_close(y, ref.forward_train(np64(x))[0], 2e-2, "bf16 output near 1e18")


@pytest.mark.parametrize("shape,layout", PATHS)
def test_float32_squares_beyond_float32_range_fall_back_to_float64(shape, layout):
    """NLC sums float32 inputs in float32 over short row runs: near 2e19 the squares of the shifted
    values pass float32's maximum (3.4e38) and the channel is summed again in float64."""
    x = make_input(shape, layout, torch.float32, seed=8, mean=2e19, std=1e19)
    y, stats, _ = CPU.forward_train(x, None, None, 1e-5)
    assert torch.isfinite(stats.m2).all() and torch.isfinite(y).all()
    assert_close(y, ref.forward_train(np64(x))[0], 2e-4, "output near 2e19")


def _drifting(rows: int, channels: int, first_row_outlier: bool) -> torch.Tensor:
    """Rows whose mean drifts a hundred standard deviations from the first row to the last (data
    sorted by a feature), optionally with a first row 1000 standard deviations away: the worst
    cases for a shift taken from the first row or from the rows reduced so far."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(rows, channels, generator=gen, dtype=torch.float64) * 0.5 + 3.0
    x += torch.linspace(0.0, 50.0, rows, dtype=torch.float64)[:, None]
    if first_row_outlier:
        x[0] = 500.0
    return x.float()


@pytest.mark.parametrize("rows", [300, 4100])
@pytest.mark.parametrize("first_row_outlier", [False, True])
def test_nlc_shifted_float32_runs_keep_the_variance_within_1e6(rows, first_row_outlier):
    x = _drifting(rows, 24, first_row_outlier)
    y, stats, _ = CPU.forward_train(x, None, None, 1e-5)
    expected, cache = ref.forward_train(np64(x))
    assert_close(stats.m2 / stats.count / torch.as_tensor(cache.var), torch.ones(24), 1e-6, "variance")
    assert_close(stats.mean / torch.as_tensor(cache.mean), torch.ones(24), 1e-7, "mean")
    assert_close(y, expected, 2e-4, "output")


# 16-bit NCL chunks sum in float32 lanes. Rows shorter than a vector put a whole chunk (~2048
# values) in one tail sum, and a shift K (the chunk's first value) deviations from the mean made
# Σd² and (Σd)²/n cancel: batch variances were 1e-5-3e-5 and means up to 1.2e-5 off the float64
# sums of the same values (torch.nn on their float32 copy: ~5e-8). Now tails add into float64 row
# by row and K is the median of the chunk's first three values, in every walk: up to 4e-7.
@pytest.mark.parametrize("shape", [(124, 40, 6), (2048, 8, 3), (500, 4, 14), (60, 16, 5, 3), (54, 300, 7, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_statistics_of_short_rows_are_those_of_float64_sums(shape, dtype):
    x = make_input(shape, "nchw", torch.float32, seed=5, mean=1.13, std=0.79).to(dtype)
    _, stats, _ = CPU.forward_train(x, None, None, 1e-5)
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    assert_close(stats.mean, mean, 2e-6, "batch mean")
    assert_close(stats.m2 / stats.count, var, 2e-6, "batch variance")
