"""bf16 channels-last input gradients and normalize passes two rows at a time
(cpu_kernels_nlc_half.inc, bf16_grad_input_two_rows and bf16_affine_two_rows) give the bits of the
row-by-row walks."""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import get_backend
from speed_helpers import assert_same_values, make_input

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")


SHAPES = [(9, 32, 3, 5), (7, 64, 3, 3), (11, 96, 2, 3), (5, 256, 3, 3), (3, 256, 33, 33)]


@pytest.mark.parametrize("shape", SHAPES)
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_channels_last_normalize_has_the_bits_of_the_nchw_rows(shape, threads, keep_threads):
    """The same for y = (x - mean)·invstd·weight + bias, with a NaN and a denormal-making weight
    (channel 1's outputs denormal), whose pairs are rounded one vector at a time."""
    torch.set_num_threads(threads)
    x = make_input(shape, "nchw", torch.bfloat16, seed=62, mean=2.0)
    x[0, 3, 0, 1] = float("nan")
    weight, bias = torch.linspace(0.5, 2.0, shape[1]), torch.linspace(-1.0, 1.0, shape[1])
    weight[1], bias[1] = 1e-39, 0.0
    _, stats, invstd = CPU.forward_train(x.nan_to_num(), weight, None, 1e-5)
    y_nchw = CPU.normalize(x, stats.mean, invstd, weight, bias)
    y_cl = CPU.normalize(x.to(memory_format=torch.channels_last), stats.mean, invstd, weight, bias)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    assert 0 < y_nchw[:, 1].float().abs().max() < 1.2e-38  # denormal outputs
    assert_same_values(y_cl.contiguous(), y_nchw, "y")
