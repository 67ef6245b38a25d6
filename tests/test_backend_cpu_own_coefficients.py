"""Elementwise passes of cache-sized tensors on several threads (cpu_kernels_own_coef.inc's
with_own_coefficients): eval from the running buffers, normalize from given statistics, and the
input gradient.

On more than one thread, a tensor within one core's L2 is walked with every thread computing
all the channels' coefficients itself, then its share of the rows. The oracles: the one-thread
call (the coefficients computed once), to the bit, whatever the thread count and the share it
gives each thread; the float64 reference; and the refusal of a negative running variance, which
must name the first such channel and leave the output unwritten however many threads found it.
"""

from __future__ import annotations

import pytest
import torch

from bnlab import reference as ref
from bnlab.backends import cpu_build, get_backend
from bnlab.backends.cpu import _CODE, layout_of
from speed_helpers import TOL, np64, rel_err, to_layout

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

# NCL rows of 49, 17 and 32 values (the aligned-run walk and the row-by-row one); rows shorter than
# a vector: 3x3 maps of 200 channels (samples with the coefficients expanded), rows of 3 values of
# 3000 channels (too many to expand: row by row) and of 2 channels (samples shorter than a
# vector); NLC rows of 300 and 37 channels, channels-last maps. Few values per channel.
CASES = [((2, 300, 7, 7), "nchw"), ((3, 40, 17), "nchw"), ((2, 24, 32), "nchw"), ((6, 200, 3, 3), "nchw"),
         ((2, 3000, 3), "nchw"), ((5, 2, 3), "nchw"), ((5, 300), "nchw"), ((7, 37), "nchw"),
         ((2, 64, 6, 6), "cl")]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def running_buffers(c: int):
    gen = torch.Generator().manual_seed(5)
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    return mean, var, weight, bias


def eval_with(lib, x, out, mean, var, weight, bias, nt) -> int:
    layout, n, c, length = layout_of(x)
    f32 = _CODE[torch.float32]
    return lib.bn_eval(x.data_ptr(), out.data_ptr(), _CODE[x.dtype], layout, n, c, length, mean.data_ptr(), f32,
                       var.data_ptr(), f32, weight.data_ptr(), f32, bias.data_ptr(), f32, 1e-5, nt)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_eval_on_several_threads_is_the_one_thread_result_to_the_bit(shape, layout, dtype):
    lib = get_backend("cpu").kernels()
    x = to_layout(torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype), layout)
    mean, var, weight, bias = running_buffers(shape[1])
    one = torch.empty_like(x)
    assert eval_with(lib, x, one, mean, var, weight, bias, 1) == 0
    expected = ref.forward_eval(np64(x), np64(mean), np64(var), np64(weight), np64(bias), eps=1e-5)
    assert rel_err(one, expected) <= TOL[dtype]
    for nt in (2, 3, 4):
        y = torch.full_like(x, float("nan"))
        assert eval_with(lib, x, y, mean, var, weight, bias, nt) == 0
        assert torch.equal(y, one), (nt, rel_err(y, one))


@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_a_negative_running_variance_is_refused_on_every_thread_count(shape, layout):
    lib = get_backend("cpu").kernels()
    x = to_layout(torch.randn(shape), layout)
    mean, var, weight, bias = running_buffers(shape[1])
    c = shape[1]
    var[c // 2] = -1e-3
    var[c - 1] = -2.0
    for nt in (1, 2, 3):
        y = torch.full_like(x, 7.0)
        assert eval_with(lib, x, y, mean, var, weight, bias, nt) == c // 2 + 1, nt
        assert bool((y == 7.0).all()), f"{nt} threads wrote the output of a refused eval"


def given_statistics(c: int):
    gen = torch.Generator().manual_seed(6)
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    invstd = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    sum_dy, sum_dy_xhat = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(2))
    return mean, invstd, sum_dy, sum_dy_xhat


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_normalize_and_input_gradient_on_several_threads_are_the_one_thread_results_to_the_bit(shape, layout, dtype):
    lib = get_backend("cpu").kernels()
    gen = torch.Generator().manual_seed(2)
    x, dy = (to_layout(torch.randn(shape, generator=gen).to(dtype), layout) for _ in range(2))
    c = shape[1]
    mean, invstd, sum_dy, sum_dy_xhat = given_statistics(c)
    _, _, weight, bias = running_buffers(c)
    lay, n, _, length = layout_of(x)
    code, f32, count = _CODE[dtype], _CODE[torch.float32], float(x.numel() // c)

    def normalize(nt):
        y = torch.full_like(x, float("nan"))
        lib.bn_normalize(x.data_ptr(), y.data_ptr(), code, lay, n, c, length, mean.data_ptr(), invstd.data_ptr(),
                         weight.data_ptr(), f32, bias.data_ptr(), f32, nt)  # fmt: skip
        return y

    def grad_input(nt):
        dx = torch.full_like(x, float("nan"))
        lib.bn_grad_input(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), code, lay, n, c, length, mean.data_ptr(),
                          invstd.data_ptr(), weight.data_ptr(), f32, sum_dy.data_ptr(), sum_dy_xhat.data_ptr(),
                          count, nt)  # fmt: skip
        return dx

    shape_c = (1, c) + (1,) * (len(shape) - 2)  # (C,) against x's (N, C, *)
    col = lambda v: np64(v).reshape(shape_c)  # noqa: E731
    xhat = (np64(x) - col(mean)) * col(invstd)
    y1, dx1 = normalize(1), grad_input(1)
    assert rel_err(y1, xhat * col(weight) + col(bias)) <= TOL[dtype]
    exact_dx = col(weight) * col(invstd) * (np64(dy) - col(sum_dy) / count - xhat * col(sum_dy_xhat) / count)
    assert rel_err(dx1, exact_dx) <= TOL[dtype]
    for nt in (2, 3, 4):
        assert torch.equal(normalize(nt), y1), nt
        assert torch.equal(grad_input(nt), dx1), nt
