"""NCL elementwise passes over rows of whole vectors (cpu_kernels_ncl_passes.inc): float32, and
bf16 in AVX2 builds without AVX-512 (in ld16_eo's even/odd order) and in AVX512-BF16 builds
(pair_rows, cpu_kernels_ncl_lines.inc: rows of whole 64-byte lines, run across the rows' ends).

Rows whose length is a multiple of 16 (4x4, 8x8, 16x16, 32x32 maps) are walked by
``affine_whole_rows`` and ``grad_input_whole_rows``: each thread's rows in one loop, the channel
carried from row to row. A thread's share may start in the middle of a sample's channels, so the
shapes here have channel counts that do not divide the rows evenly among 1, 2 or 3 threads.
Oracles as for the runs across vector ends (test_backend_cpu_lines.py): the channels-last pass of
the same backend, which must agree to the bit, and the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import cpu_build, get_backend
from speed_helpers import assert_same_values, to_layout
from test_backend_cpu_lines import (
    THREADS,
    check_grad_input_against_the_channels_last_pass,
    check_normalize_against_the_channels_last_pass,
    grad_input_with,
    normalize_with,
    placed,
    statistics,
)

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

SHAPES = [(1, 1, 16), (3, 5, 16), (2, 7, 64), (5, 3, 32), (2, 3, 256), (3, 5, 1024)]
DTYPES = [torch.float32, torch.bfloat16]  # bf16: the loops on AVX2-only CPUs, pair_rows on AVX512-BF16 ones


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_normalize_against_the_channels_last_pass(shape, dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_grad_input_against_the_channels_last_pass(shape, dtype, seed=6)


@pytest.mark.parametrize("shape", [(5, 3, 64), (3, 5, 32), (2, 3, 256)], ids=str)
def test_bf16_rows_with_nan_and_denormal_results_are_the_channels_last_pass_to_the_bit(shape):
    """bf16 pairs holding a NaN or a denormal result are rounded as single vectors (vcvtne2ps2bf16
    would flush the denormals): a NaN input in some rows and a denormal weight in channel 1 (its
    outputs denormal) must still give the channels-last pass's bits, NaN where it has NaN."""
    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(9)
    x, dy = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
    x[0, 2, 5] = x[-1, 0, -1] = float("nan")
    mean, invstd, weight, bias, sum_dy, sum_dy_xhat = statistics(shape[1])
    weight[1], bias[1] = 1e-39, 0.0  # a float32 denormal: channel 1's outputs are denormal or zero
    count = x.numel() // shape[1]
    y_cl = cpu.normalize(to_layout(x, "cl"), mean, invstd, weight, bias)
    dx_cl = cpu.grad_input(to_layout(dy, "cl"), to_layout(x, "cl"), mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    assert y_cl[:, 1].float().abs().max() < 1.2e-38 and y_cl[:, 1].float().abs().max() > 0  # denormal results
    lib = cpu.kernels()
    for nt in THREADS:
        y = normalize_with(lib, x, placed(torch.zeros_like(x), 0), mean, invstd, weight, bias, nt)
        dx = placed(torch.zeros_like(x), 0)
        dx = grad_input_with(lib, dy, x, dx, mean, invstd, weight, sum_dy, sum_dy_xhat, count, nt)
        assert_same_values(y, y_cl, f"y, {nt} threads")
        assert_same_values(dx, dx_cl, f"dx, {nt} threads")
