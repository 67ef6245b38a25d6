"""NCL elementwise passes over runs of rows in aligned vectors (cpu_kernels_ncl_lines.inc).

Rows of at least 16 values whose length is not a multiple of 16 (7x7, 9x9, 14x14 maps, 1-d
signals of odd length) are walked as one stream per thread, in vectors aligned to the output,
the vector that holds a row's end blending two channels' coefficients. Where the stream starts
and where its vectors fall depends on the output's address and on how the rows are shared among
the threads, so each pass is run here with outputs (and inputs) at every offset within a vector
and on 1, 2 and 3 threads. Oracles: the channels-last pass of the same backend, a different walk
(rows of C channels) with the same per-value arithmetic, which must agree to the bit; and the
float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bnlab import reference as ref
from bnlab.backends import cpu_build, get_backend
from bnlab.backends.cpu import _CODE, layout_of
from speed_helpers import TOL, np64, rel_err, to_layout

pytestmark = pytest.mark.skipif(cpu_build.load() is None, reason="bnlab's CPU kernels did not build")

# (rows of 130-289 values: runs on AVX-512 builds, rows one by one on AVX2 builds)
SHAPES = [(1, 1, 17), (3, 5, 30), (2, 3, 49), (2, 7, 81), (1, 4, 196), (4, 2, 35), (2, 3, 1000), (5, 3, 196),
          (3, 3, 130), (2, 7, 150), (3, 5, 289)]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OFFSETS = (0, 1, 5, 15)  # values: every vector start of a 64-byte line is reached by one of them
THREADS = (1, 2, 3)


def placed(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of contiguous t that starts `offset` values into a fresh buffer (a misaligned view)."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    out = buf[offset : offset + t.numel()].view(t.shape)
    out.copy_(t)
    return out


def statistics(c: int):
    gen = torch.Generator().manual_seed(11)
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    invstd = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    sum_dy, sum_dy_xhat = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(2))
    return mean, invstd, weight, bias, sum_dy, sum_dy_xhat


def backend_and_inputs(shape, dtype, seed: int):
    """(CPU backend, its compiled kernels, x, dy): random (N, C, L) inputs of dtype, contiguous."""
    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    return cpu, cpu.kernels(), x, dy


def col(v: torch.Tensor):
    """A (C,) tensor as a float64 (C, 1) array, against (N, C, L) ones."""
    return np64(v)[:, None]


def normalize_with(lib, x, out, mean, invstd, weight, bias, nt):
    layout, n, c, length = layout_of(x)
    f32 = _CODE[torch.float32]
    lib.bn_normalize(x.data_ptr(), out.data_ptr(), _CODE[x.dtype], layout, n, c, length, mean.data_ptr(),
                     invstd.data_ptr(), weight.data_ptr(), f32, bias.data_ptr(), f32, nt)  # fmt: skip
    return out


def grad_input_with(lib, dy, x, out, mean, invstd, weight, sum_dy, sum_dy_xhat, count, nt):
    layout, n, c, length = layout_of(x)
    lib.bn_grad_input(dy.data_ptr(), x.data_ptr(), out.data_ptr(), _CODE[x.dtype], layout, n, c, length,
                      mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(), _CODE[torch.float32],
                      sum_dy.data_ptr(), sum_dy_xhat.data_ptr(), float(count), nt)  # fmt: skip
    return out


def check_normalize_against_the_channels_last_pass(shape, dtype, seed: int):
    """Assert that the NCL normalize of a random (N, C, L) input equals the channels-last pass to
    the bit, at every output offset (the input at another) on 1-3 threads, and that pass is within
    the dtype's tolerance of the float64 reference."""
    cpu, lib, x, _ = backend_and_inputs(shape, dtype, seed)
    mean, invstd, weight, bias, _, _ = statistics(shape[1])
    expected = cpu.normalize(to_layout(x, "cl"), mean, invstd, weight, bias)
    exact = (np64(x) - col(mean)) * col(invstd) * col(weight) + col(bias)
    assert rel_err(expected, exact) <= TOL[dtype]
    for nt in THREADS:
        for offset in OFFSETS:
            xs = placed(x, (offset * 7) % 16)
            y = normalize_with(lib, xs, placed(torch.zeros_like(x), offset), mean, invstd, weight, bias, nt)
            assert torch.equal(y, expected), (nt, offset, rel_err(y, expected))


def check_grad_input_against_the_channels_last_pass(shape, dtype, seed: int):
    """The same for the input gradient from given sums (dy, x and dx at three offsets)."""
    cpu, lib, x, dy = backend_and_inputs(shape, dtype, seed)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normalize_of_rows_across_vector_ends_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_normalize_against_the_channels_last_pass(shape, dtype, seed=1)


BEYOND_L2 = [(16, 1024, 49), (8, 1024, 100), (4, 1024, 196)]  # 3.2, 3.3 and 3.2 MB of float32


def check_normalize_beyond_the_l2(shape, dtype):
    """Assert that the NCL normalize of a tensor larger than most cores' L2 equals the
    channels-last pass to the bit, at every output offset and thread count."""
    cpu, lib, x, _ = backend_and_inputs(shape, dtype, seed=4)
    mean, invstd, weight, bias, _, _ = statistics(shape[1])
    expected = cpu.normalize(to_layout(x, "cl"), mean, invstd, weight, bias)
    exact = (np64(x) - col(mean)) * col(invstd) * col(weight) + col(bias)
    assert rel_err(expected, exact) <= TOL[dtype]
    for nt in THREADS:
        for offset in OFFSETS:
            out = placed(torch.zeros_like(x), offset)
            y = normalize_with(lib, placed(x, offset), out, mean, invstd, weight, bias, nt)
            assert torch.equal(y, expected), (nt, offset, rel_err(y, expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", BEYOND_L2, ids=str)
def test_normalize_of_rows_beyond_the_l2_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_normalize_beyond_the_l2(shape, dtype)


def test_normalize_with_output_lines_requested_ahead_is_the_channels_last_pass_to_the_bit():
    # ncl_normalize requests each row's output lines two rows ahead (ncl_normalize's `ahead`)
    # above BNLAB_WRITE_AHEAD_MIN_BYTES: by default only on Intel CPUs with AVX-512, so the bound
    # is set to 0 here, in a fresh process (the kernels read it once), to take that code on any
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_backend_cpu_lines as t\n"
        "for shape in t.BEYOND_L2:\n"
        "    for dtype in (torch.float32, torch.bfloat16): t.check_normalize_beyond_the_l2(shape, dtype)\n"
        "print('checked', len(t.BEYOND_L2) * 2)"
    )
    env = dict(os.environ, BNLAB_WRITE_AHEAD_MIN_BYTES="0")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["checked", "6"], out.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_of_rows_across_vector_ends_is_the_channels_last_pass_to_the_bit(shape, dtype):
    check_grad_input_against_the_channels_last_pass(shape, dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 49), (3, 5, 30), (2, 7, 81)], ids=str)
def test_training_step_of_rows_across_vector_ends_matches_the_float64_reference(shape, dtype):
    # The whole forward and backward through the backend (the channel groups' runs, or the flat
    # walk, whichever the shape takes), against the float64 reference.
    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    y, stats, invstd = cpu.forward_train(x, None, None, 1e-5)
    dx, _, _ = cpu.backward(dy, x, stats.mean, invstd, None, stats.count, True)
    ey, cache = ref.forward_train(np64(x))
    edx, _, _ = ref.backward(np64(dy), cache)
    assert rel_err(y, ey) <= TOL[dtype]
    assert rel_err(dx, edx) <= TOL[dtype]
