"""dx of a channel constant in both x and dy is exactly 0 on every path (docs/math.md §4.2).

There x̂ = 0 and dy equals its mean, so the float64 reference's dx is 0 exactly. The elementwise
phase takes dy's mean off before the product (dx = k·(dy - g_hi) + (a·(x - hi) + c)); the form
before it, k·dy + ... + c, left the rounding of k·dy there (up to 3.7e-4 with invstd = 1/sqrt(eps),
found by benchmarks/fuzz_kernels.py). The shapes reach each walk of the CPU kernels: NCL per
channel, waves, long rows, rows across line ends (7x7, 14x14), whole-vector rows, rows shorter
than a vector (by sample), channel groups; NLC narrow (8-32 channels), periodic (few channels),
16-lane (40), wide (64) and bf16 unpacked rows, and the NLC channel-group sums ((92, 20), the
case fuzz_kernels.py found: Σdy of a constant gradient in float32 runs).
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import elementwise
from bnlab.backends import get_backend
from speed_helpers import make_input

CPU = get_backend("cpu")
SHAPES = [
    ((16, 8, 9, 9), "nchw"),
    ((96, 3, 16, 16), "nchw"),
    ((2, 3, 5003), "nchw"),
    ((8, 16, 7, 7), "nchw"),
    ((4, 32, 14, 14), "nchw"),
    ((8, 16, 8, 8), "nchw"),
    ((64, 24, 2, 2), "nchw"),
    ((32, 64, 5), "nchw"),
    ((40, 5, 3, 3), "cl"),
    ((64, 16, 4, 4), "cl"),
    ((64, 40, 3, 3), "cl"),
    ((32, 64, 4, 4), "cl"),
    ((16, 96, 3, 3), "cl"),
    ((257, 6), "nchw"),
    ((4100, 10), "nchw"),
    ((92, 20), "nchw"),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _constant_channels(shape, layout, dtype):
    """x and dy random, except channels 1 and C-1, constant in both (channel C-1 with a large dy).
    The constants use their whole mantissa (0.1, 96.123456...), whose float32 multiples are not
    exact: a Σdy in float32 then misses n·dy, which the dy shift (grad_shift) avoids."""
    x = make_input(shape, layout, dtype, seed=11, mean=3.0)
    dy = make_input(shape, layout, dtype, seed=12)
    last = shape[1] - 1
    x[:, 1], dy[:, 1] = 0.7, 0.1
    x[:, last], dy[:, last] = -41.53, 96.123456789
    return x, dy, [1, last]


def _assert_zero(dx, channels, what, dy=None, kk=None):
    """dx exactly 0 on the channels; for float64 (given dy and kk = w·invstd) within 4 units of
    kk·dy: there dy's mean is not rounded to another precision, and n·g / n need not give g back."""
    for c in channels:
        worst = float(dx[:, c].double().abs().max())
        bound = 0.0
        if dx.dtype == torch.float64 and dy is not None:
            bound = 4 * torch.finfo(torch.float64).eps * float(kk[c]) * float(dy[:, c].abs().max())
        assert worst <= bound, f"{what}: dx of constant channel {c} is {worst}, expected {bound or 'exactly 0'}"


@pytest.mark.parametrize("batch_mean", [True, False], ids=["centred", "whole-dy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_cpu_backward_is_exactly_zero_on_constant_channels(shape, layout, dtype, batch_mean):
    x, dy, channels = _constant_channels(shape, layout, dtype)
    weight = torch.linspace(0.5, 2.0, shape[1])
    y, stats, invstd = CPU.forward_train(x, weight, None, 1e-5)
    dx, _, _ = CPU.backward(dy, x, stats.mean, invstd, weight, stats.count, True, batch_mean=batch_mean)
    kk = weight.double() * invstd.double()
    _assert_zero(dx, channels, "backward", dy, kk)
    sums = CPU.grad_sums(dy, x, stats.mean, invstd, batch_mean)
    dx_primitive = CPU.grad_input(dy, x, stats.mean, invstd, weight, sums[0], sums[1], stats.count)
    _assert_zero(dx_primitive, channels, "grad_input primitive", dy, kk)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("batch_mean", [True, False], ids=["centred", "whole-dy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", [((16, 8, 9, 9), "nchw"), ((40, 5, 3, 3), "cl")])
def test_portable_grad_input_is_exactly_zero_on_constant_channels(shape, layout, dtype, batch_mean):
    x, dy, channels = _constant_channels(shape, layout, dtype)
    weight = torch.linspace(0.5, 2.0, shape[1])
    dims = [0] + list(range(2, x.dim()))
    mean = x.double().mean(dims)
    var = x.double().var(dims, unbiased=False)
    invstd = 1.0 / torch.sqrt(var + 1e-5)
    sum_dy, sum_dy_xhat = elementwise.grad_sums(dy, x, mean, invstd, batch_mean)
    count = x.numel() // shape[1]
    dx = elementwise.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
    _assert_zero(dx, channels, "portable grad_input")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_module_backward_is_exactly_zero_on_constant_channels(memory_format):
    """Through the module and autograd (the compiled entry where it is set up), against torch.nn."""
    x, dy, channels = _constant_channels((8, 6, 5, 5), "nchw", torch.float32)
    x, dy = x.to(memory_format=memory_format), dy.to(memory_format=memory_format)
    bn = bnlab.BatchNorm2d(6)
    xg = x.clone().requires_grad_(True)
    bn(xg).backward(dy)
    _assert_zero(xg.grad, channels, "BatchNorm2d")
    ref = torch.nn.BatchNorm2d(6)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(dy)
    others = [c for c in range(6) if c not in channels]
    torch.testing.assert_close(xg.grad[:, others], xr.grad[:, others], rtol=2e-4, atol=2e-4)

