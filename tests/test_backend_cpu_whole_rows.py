"""NCL elementwise passes over float32 rows of whole vectors (cpu_kernels_ncl_passes.inc).

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

from bnlab.backends import cpu_build
from speed_helpers import TOL, np64, rel_err, to_layout
from test_backend_cpu_lines import (
    OFFSETS,
    THREADS,
    backend_and_inputs,
    col,
    grad_input_with,
    normalize_with,
    placed,
    statistics,
)

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

SHAPES = [(1, 1, 16), (3, 5, 16), (2, 7, 64), (5, 3, 32), (2, 3, 256), (3, 5, 1024)]
DTYPES = [torch.float32, torch.bfloat16]  # float32 takes the loops; bf16 checks the dispatch leaves it alone


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    cpu, lib, x, _ = backend_and_inputs(shape, dtype, seed=5)
    mean, invstd, weight, bias, _, _ = statistics(shape[1])
    expected = cpu.normalize(to_layout(x, "cl"), mean, invstd, weight, bias)
    exact = (np64(x) - col(mean)) * col(invstd) * col(weight) + col(bias)
    assert rel_err(expected, exact) <= TOL[dtype]
    for nt in THREADS:
        for offset in OFFSETS:
            out = placed(torch.zeros_like(x), offset)
            y = normalize_with(lib, placed(x, (offset * 7) % 16), out, mean, invstd, weight, bias, nt)
            assert torch.equal(y, expected), (nt, offset, rel_err(y, expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    cpu, lib, x, dy = backend_and_inputs(shape, dtype, seed=6)
    mean, invstd, weight, _, sum_dy, sum_dy_xhat = statistics(shape[1])
    count = x.numel() // shape[1]
    expected = cpu.grad_input(to_layout(dy, "cl"), to_layout(x, "cl"), mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    xhat = (np64(x) - col(mean)) * col(invstd)
    exact = col(weight) * col(invstd) * (np64(dy) - col(sum_dy) / count - xhat * col(sum_dy_xhat) / count)
    assert rel_err(expected, exact) <= TOL[dtype]
    for nt in THREADS:
        for offset in OFFSETS:
            dx = placed(torch.zeros_like(x), offset)
            got = grad_input_with(lib, placed(dy, (offset * 3) % 16), placed(x, (offset * 7) % 16), dx, mean, invstd,
                                  weight, sum_dy, sum_dy_xhat, count, nt)  # fmt: skip
            assert torch.equal(got, expected), (nt, offset, rel_err(got, expected))
