"""Quotients by a power-of-two count (cpu_kernels_stats.inc, with_count): the kernels multiply by the exact
reciprocal, which must give the bits of the division, subnormals and signs included. The outside
oracle is NumPy's float64 arithmetic, which rounds every operation: invstd must be
1/sqrt(M2/n + eps) of the kernel's own M2, to the bit, for counts that are powers of two and counts
that are not (divided), on the narrow and general NLC walks and the NCL ones (which divide), one and
two threads, with eps 0 (the quotient alone) and quotients down to subnormal. It fails with every
count multiplied by its rounded reciprocal. (Whether the product is kept apart from the sum after
it, with_count's fma form, it cannot see: a power-of-two product is exact, fused or not, but for
subnormal quotients, which an added eps swamps.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab.backends import get_backend

CPU = get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU.kernels() is None, reason="the CPU kernels did not build")

# (N, C): 2 to 16 rows take the narrow walk on one thread, 64 and 256 the general one; 3, 6, 100
# are not powers of two. (4, 24, 2, 2) and (16, 8, 4, 4): NCL with counts 16 and 256.
SHAPES = [(2, 300), (4, 33), (8, 1000), (16, 64), (64, 40), (256, 100), (3, 300), (6, 33), (100, 40),
          (4, 24, 2, 2), (16, 8, 4, 4), (3, 24, 2, 2)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-5), (torch.float64, 1e-5), (torch.float64, 0.0)])
def test_invstd_is_the_rounded_quotient_of_m2_by_the_count(shape, threads, dtype, eps, keep_threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(shape))
    # channel scales from 1e-170 (float64; float32 from 1e-20) to 1e3: float64 M2/n down to subnormal
    low = -170 if dtype == torch.float64 else -20
    scale = torch.logspace(low, 3, shape[1], dtype=torch.float64)
    if dtype == torch.float64:
        scale[1] = 1e-156  # squares near 1e-312: channel 1's M2/n subnormal whatever C
    scale = scale.view(1, -1, *([1] * (len(shape) - 2)))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    _, stats, invstd = CPU.forward_train(x, None, None, eps)
    m2 = stats.m2.numpy()
    n = np.float64(x.numel() // shape[1])
    with np.errstate(divide="ignore"):  # eps 0 and M2 0 (an underflowed channel): 1/0 = inf, as the kernels'
        expected = np.float64(1.0) / np.sqrt(m2 / n + np.float64(eps))  # NumPy: each operation rounded once
    assert np.array_equal(invstd.numpy().view(np.int64), expected.view(np.int64))
    if dtype == torch.float64:
        assert ((m2 > 0) & (m2 / n < np.finfo(np.float64).tiny)).any()  # subnormal quotients reached
