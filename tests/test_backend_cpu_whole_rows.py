"""NCL elementwise passes over rows of whole vectors (cpu_kernels_ncl_passes.inc): float32, and
bf16 in AVX2 builds without AVX-512 (in ld16_eo's even/odd order).

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
from test_backend_cpu_lines import (
    check_grad_input_against_the_channels_last_pass,
    check_normalize_against_the_channels_last_pass,
)

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

SHAPES = [(1, 1, 16), (3, 5, 16), (2, 7, 64), (5, 3, 32), (2, 3, 256), (3, 5, 1024)]
DTYPES = [torch.float32, torch.bfloat16]  # bf16 takes the loops on AVX2-only CPUs, its row walk elsewhere


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_normalize_against_the_channels_last_pass(shape, dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_of_whole_vector_rows_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_grad_input_against_the_channels_last_pass(shape, dtype, seed=6)
