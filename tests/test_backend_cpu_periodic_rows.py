"""bf16 rows whose width is not a whole number of vectors (cpu_kernels_nlc_short.inc: C % 16 != 0,
lcm(C, 16) <= 512 values; the lab's 100 hidden units) go in periods of whole pairs of vectors on
AVX512-BF16 builds, two periods at a time with each coefficient vector loaded once for both, then
in runs of two blocks, then block by block. Whatever the split, each value gets the same
operations: the normalize pass and the input gradient of an (N, C) input must have the bits of the
same values as (1, C, N), channel c's N values contiguous, walked in the other layout (NCL) by
other loops. Row counts that leave every kind of
remainder, one and two threads, NaN inputs and a denormal-making weight (whose pairs are rounded
one vector at a time)."""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import get_backend
from bnlab.backends.cpu import layout_of
from speed_helpers import as_ncl, assert_same_values, from_ncl, row_walk_inputs

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")

# C, rows: (100: blocks of 4 rows, periods of 8) 16 rows = one pair of periods, 29 = a pair, a run and a block
# and 1 row; 40 (blocks of 2 rows, periods of 4); 7 (blocks of 16 rows: a block is whole pairs); 72
CASES = [(100, 16), (100, 29), (100, 3), (40, 21), (7, 70), (72, 37)]


@pytest.mark.parametrize("c,rows", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_periodic_rows_have_the_bits_of_the_ncl_walk(c, rows, threads, keep_threads):
    torch.set_num_threads(threads)
    inputs = row_walk_inputs(rows, c, seed=c + rows, dtype=torch.bfloat16)
    x, dy, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat) = inputs
    y = CPU.normalize(x, mean, invstd, weight, bias)
    y_ncl = from_ncl(CPU.normalize(as_ncl(x), mean, invstd, weight, bias))
    assert layout_of(x)[0] == 1 and layout_of(as_ncl(x))[0] == 0  # NLC against NCL
    assert 0 < y[:, 1].float().abs().max() < 1.2e-38 and y.isnan().any()
    assert_same_values(y, y_ncl, "y")
    dx = CPU.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, rows)
    dx_ncl = from_ncl(CPU.grad_input(as_ncl(dy), as_ncl(x), mean, invstd, weight, sum_dy, sum_dy_xhat, rows))
    assert_same_values(dx, dx_ncl, "dx")
