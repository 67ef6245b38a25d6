"""float32 NLC rows in the forms that keep their coefficients in registers (AVX-512 builds).

The elementwise passes of NLC inputs (channels-last activations, (N, C) inputs) take rows of
C = 16·W channels, W = 3..8, in nlc_affine_registers (eval, the forward's normalize) and, for
W = 3..5, nlc_grad_input_registers (the input gradient), every coefficient vector in a register;
and rows whose channels repeat every lcm(C, 16) <= 512 values (7, 40, 100 channels) four blocks
at a time with the eval's coefficients pinned to registers (nlc_affine_periodic; both fifty-first
session). They perform the operations of the per-channel NCL walk on the same coefficients, so
the NLC results must equal the NCL results of the same values to the bit (on builds without
AVX-512 the other NLC forms are held to the same). Row counts below and beyond four blocks, data
with a NaN, an infinity, denormal outputs (a weight of 1e-39) and values at 1e3 ± 0.01.
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab.backends import get_backend
from bnlab.backends.cpu import layout_of
from conftest import assert_close
from speed_helpers import as_ncl, from_ncl, row_walk_inputs

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")

WIDTHS = [48, 64, 80, 96, 112, 128]
PERIODIC = [7, 40, 100]  # blocks of 16, 2 and 4 rows


def _same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{what}: NLC and NCL bits differ"


@pytest.mark.parametrize("c", WIDTHS + PERIODIC)
@pytest.mark.parametrize("rows", [2, 7, 33, 70])
@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["normal", "offset"])
@pytest.mark.parametrize("threads", [1, 2])
def test_f32_rows_have_the_bits_of_the_ncl_walk(c, rows, offset, threads, keep_threads):
    torch.set_num_threads(threads)
    inputs = row_walk_inputs(rows, c, c + rows, offset=offset, infinity=True)
    x, dy, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat) = inputs
    assert layout_of(x)[0] == 1 and layout_of(as_ncl(x))[0] == 0  # NLC against NCL
    y = CPU.normalize(x, mean, invstd, weight, bias)
    assert y.isnan().any() and 0 < y[:, 1].abs().max() < 1.2e-38
    _same_bits(y, from_ncl(CPU.normalize(as_ncl(x), mean, invstd, weight, bias)), "y")
    dx = CPU.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, rows)
    dx_ncl = from_ncl(CPU.grad_input(as_ncl(dy), as_ncl(x), mean, invstd, weight, sum_dy, sum_dy_xhat, rows))
    _same_bits(dx, dx_ncl, "dx")


@pytest.mark.parametrize("c", WIDTHS)
def test_channels_last_layers_of_these_widths_match_torch_nn(c):
    torch.manual_seed(c)
    ours, theirs = bnlab.BatchNorm2d(c), torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 2.0, c))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    x = (torch.randn(6, c, 5, 5) * 3 + 2).contiguous(memory_format=torch.channels_last)
    for layer in (ours, theirs):
        layer(x)  # one training step: running statistics
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 2e-4, "eval output")
