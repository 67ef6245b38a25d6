"""Eval of cache-sized tensors on several threads (cpu_kernels_api.inc's eval_own_coefficients).

On more than one thread, a tensor within one core's L2 is evaluated with every thread computing
all the channels' coefficients itself from the running buffers, then its share of the rows. The
oracles: the one-thread call (the coefficients computed once), to the bit, whatever the thread
count and the share it gives each thread; the float64 reference; and the refusal of a negative
running variance, which must name the first such channel and leave the output unwritten however
many threads found it.
"""

from __future__ import annotations

import pytest
import torch

from bnlab import reference as ref
from bnlab.backends import cpu_build, get_backend
from bnlab.backends.cpu import _CODE, layout_of
from speed_helpers import TOL, np64, rel_err, to_layout

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

# NCL rows of 49, 17 and 32 values (the aligned-run walk and the row-by-row one), NLC rows of 300
# and 37 channels, channels-last maps; few values per channel, many channels.
CASES = [((2, 300, 7, 7), "nchw"), ((3, 40, 17), "nchw"), ((2, 24, 32), "nchw"), ((5, 300), "nchw"),
         ((7, 37), "nchw"), ((2, 64, 6, 6), "cl")]  # fmt: skip
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
