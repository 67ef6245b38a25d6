"""The input gradient of float32 data with a very large spread keeps the float64 reference's precision.

dx = kk·(dy - mean(dy)) + a·(x - mean) + c, with kk = γ·invstd and a = -kk·invstd·Σdy·x̂/m kept
in the compute dtype. For float32 data of a standard deviation from about 1e19, a falls below
float32's normal range: rounded to a subnormal or to 0, it dropped the x̂ term, and dx was 0.5 %
off the reference at a spread of 1e20 and 4.5 % from 1e22 on, on the CPU kernels and the
portable backend alike (torch.nn's dx is NaN or 0 there from 1e19). Such a channel's dx is now
computed again in float64 from its sums (the forty-ninth session). These tests compare with the
float64 reference, both through the layer and through the backends' grad_input primitive (the
CPU kernels' bn_grad_input, which SyncBatchNorm calls).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.backends import get_backend


def _data(shape, spread, dtype, memory_format, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * spread).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)


def _close_to_the_largest(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0 and np.isfinite(scale)
    np.testing.assert_allclose(actual.detach().double().numpy() / scale, expected / scale, rtol=0, atol=tol,
                               err_msg=what)


@pytest.mark.parametrize("spread", [1e20, 1e25, 1e33], ids=["1e20", "1e25", "1e33"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (64, 4, 1, 1), (16, 40, 3, 3)], ids=["maps", "rows", "many"])
def test_layer_input_gradient_at_a_large_spread_is_the_references(backend, spread, dtype, memory_format, shape):
    x, dy = _data(shape, spread, dtype, memory_format)
    layer = bnlab.BatchNorm2d(shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
    xg = x.clone().requires_grad_()
    layer(xg).backward(dy)
    _, cache = ref.forward_train(x.double().numpy(), layer.weight.detach().double().numpy(), np.zeros(shape[1]),
                                 layer.eps)
    dx64, dw64, db64 = ref.backward(dy.double().numpy(), cache)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    _close_to_the_largest(xg.grad, dx64, tol, "dx")
    np.testing.assert_allclose(layer.weight.grad.double().numpy(), dw64, rtol=1e-4, atol=1e-4 * np.abs(dw64).max())
    np.testing.assert_allclose(layer.bias.grad.double().numpy(), db64, rtol=1e-4, atol=1e-4 * np.abs(db64).max())


@pytest.mark.parametrize("name", ["cpu", "portable"])
@pytest.mark.parametrize("layout", ["nchw", "cl", "transposed"])
@pytest.mark.parametrize("count_type", [int, torch.tensor], ids=["int", "tensor"])
def test_grad_input_primitive_at_a_large_spread_is_the_references(name, layout, count_type):
    """Also with a tensor count (SyncBatchNorm's merged one; masked BN's) and a permuted input, which
    the CPU backend hands to the portable path: the check had been skipped for a tensor count."""
    backend = get_backend(name)
    memory_format = torch.channels_last if layout == "cl" else torch.contiguous_format
    x, dy = _data((12, 5, 4, 4), 1e24, torch.float32, memory_format)
    if layout == "transposed":
        x, dy = x.transpose(2, 3), dy.transpose(2, 3)
    if not backend.supports(x):
        pytest.skip(f"the {name} backend is not available here")
    x64, dy64 = x.double(), dy.double()
    dims = (0, 2, 3)
    mean = x64.mean(dims)
    invstd = 1 / torch.sqrt(x64.var(dims, unbiased=False) + 1e-5)
    xhat = (x64 - mean[:, None, None]) * invstd[:, None, None]
    sum_dy, sum_dy_xhat = dy64.sum(dims), (dy64 * xhat).sum(dims)
    weight = torch.linspace(0.5, 2.0, 5)
    count = x.numel() // 5
    given = count_type(float(count), dtype=torch.float64) if count_type is torch.tensor else count
    dx = backend.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, given)
    k = (weight.double() * invstd)[:, None, None]
    expected = k * (dy64 - (sum_dy / count)[:, None, None] - xhat * (sum_dy_xhat / count)[:, None, None])
    _close_to_the_largest(dx, expected.numpy(), 2e-6, "dx")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_masked_layer_input_gradient_at_a_large_spread_is_the_references(backend, memory_format):
    """Masked BN's count is a tensor: its portable backward had kept the underflowed coefficient
    (dx 5.3e-2 off at a spread of 1e25, before the fiftieth session)."""
    x, dy = _data((8, 3, 5, 5), 1e25, torch.float32, memory_format)
    mask = torch.rand(8, 5, 5, generator=torch.Generator().manual_seed(5)) < 0.7
    layer = bnlab.BatchNorm2d(3)
    xg = x.clone().requires_grad_()
    layer(xg, mask=mask).backward(dy * mask[:, None])
    selected = x.permute(1, 0, 2, 3)[:, mask].T.double().numpy()  # (M, C) of the selected positions
    _, cache = ref.forward_train(selected, np.ones(3), np.zeros(3), layer.eps)
    dx64, _, _ = ref.backward(dy.permute(1, 0, 2, 3)[:, mask].T.double().numpy(), cache)
    _close_to_the_largest(xg.grad.permute(1, 0, 2, 3)[:, mask].T, dx64, 2e-6, "dx at the selected positions")
