"""bf16 channels-last input gradients two rows at a time (cpu_kernels_nlc_half.inc,
bf16_grad_input_two_rows) give the bits of the row-by-row walks."""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import get_backend
from speed_helpers import make_input

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")


@pytest.mark.parametrize("shape", [(9, 32, 3, 5), (7, 64, 3, 3), (11, 96, 2, 3), (5, 256, 3, 3), (3, 256, 33, 33)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_channels_last_input_gradient_has_the_bits_of_the_nchw_rows(shape, threads):
    """bf16 channels-last rows of a multiple of 32 channels go two rows at a time (one load of each
    coefficient for both, cpu_kernels_nlc_half.inc), odd row counts and shares ending in a single
    row included; with the same sums the input gradient must have the bits of the NCHW walk, whose
    rows go one at a time through the same arithmetic and rounding. ((3, 256, 33, 33): one thread's
    share beyond the L2, row by row; two threads' within it, two rows at a time.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = make_input(shape, "nchw", torch.bfloat16, seed=60, mean=2.0)
        dy = make_input(shape, "nchw", torch.bfloat16, seed=61)
        weight = torch.linspace(0.5, 2.0, shape[1])
        _, stats, invstd = CPU.forward_train(x, weight, None, 1e-5)
        sums = CPU.grad_sums(dy, x, stats.mean, invstd)
        args = (stats.mean, invstd, weight, sums[0], sums[1], stats.count)
        cl = torch.channels_last
        dx_nchw = CPU.grad_input(dy, x, *args)
        dx_cl = CPU.grad_input(dy.to(memory_format=cl), x.to(memory_format=cl), *args)
        assert dx_cl.is_contiguous(memory_format=cl)
        assert torch.equal(dx_cl.contiguous(), dx_nchw)
    finally:
        torch.set_num_threads(before)
