"""Ghost BN (virtual_batch_size) against the float64 reference of Hoffer et al.'s definition and torch.nn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.variants import reference as vref
from features_util import assert_close, to_np

LAYERS = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}


def _layer(shape, dtype=torch.float64, **options):
    torch.manual_seed(1)
    layer = LAYERS[len(shape)](shape[1], dtype=dtype, **options)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize(
    "shape, k",
    [((7, 3, 5), 3), ((8, 2, 3, 3), 4), ((6, 4), 2), ((7, 3), 5), ((9, 2, 2, 2, 3), 4), ((4, 3, 5), 1)],
)
def test_forward_backward_and_running_stats_match_the_reference(shape, k):
    layer = _layer(shape, virtual_batch_size=k)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    gamma, beta = to_np(layer.weight), to_np(layer.bias)
    y_ref, caches, whole = vref.ghost_forward_train(to_np(x), gamma, beta, layer.eps, k)
    dx_ref, dgamma_ref, dbeta_ref = vref.ghost_backward(to_np(dy), caches)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(x.grad, dx_ref, 1e-10, "dx")
    assert_close(layer.weight.grad, dgamma_ref, 1e-10, "dgamma")
    assert_close(layer.bias.grad, dbeta_ref, 1e-10, "dbeta")
    mean, var, _ = ref.update_running_stats(np.zeros(shape[1]), np.ones(shape[1]), whole, 0.1)
    assert_close(layer.running_mean, mean, 1e-12, "running_mean (whole batch)")
    assert_close(layer.running_var, var, 1e-12, "running_var (whole batch)")


# 5-D too: its output had come back contiguous (plain BN keeps channels_last_3d)
@pytest.mark.parametrize("shape, layout", [((6, 3, 4, 4), torch.channels_last), ((8, 3, 2, 4, 4), torch.channels_last_3d)])
def test_float32_channels_last_matches_the_reference_and_keeps_the_layout(shape, layout):
    k = shape[0] // 2 - 1  # two ghost batches and a smaller last one
    layer = _layer(shape, dtype=torch.float32, virtual_batch_size=k)
    x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=layout)
    y = layer(x)
    y_ref, _, _ = vref.ghost_forward_train(to_np(x), to_np(layer.weight), to_np(layer.bias), layer.eps, k)
    assert_close(y, y_ref, 2e-4, "y")
    assert y.is_contiguous(memory_format=layout) and not y.is_contiguous()


@pytest.mark.parametrize("k", [8, 100])
def test_virtual_batch_equal_to_or_larger_than_the_batch_is_plain_bn(k):
    x = (torch.randn(8, 3, 5) * 2 + 1).requires_grad_()
    ghost = bnlab.BatchNorm1d(3, virtual_batch_size=k)
    plain = torch.nn.BatchNorm1d(3)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(8, 3, 5)
    ghost(x).backward(dy)
    plain(x2).backward(dy)
    assert_close(x.grad, x2.grad, 2e-4, "dx")
    assert_close(ghost.weight.grad, plain.weight.grad, 2e-4, "dgamma")
    for key, value in plain.state_dict().items():
        assert_close(ghost.state_dict()[key], value, 2e-6, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_virtual_batch_of_the_whole_batch_gives_plain_bnlab_bns_bits(backend, dtype):
    # "k = N is plain BN exactly" (docs/features.md), the running averages too: in float64 the CPU
    # kernels' had been an ulp off the Python update's (a product fused into the sum)
    torch.manual_seed(6)
    ghost = bnlab.BatchNorm2d(3, virtual_batch_size=6, dtype=dtype)
    plain = bnlab.BatchNorm2d(3, dtype=dtype)
    for _ in range(3):
        x = torch.randn(6, 3, 5, 5, dtype=dtype) * 3 + 2
        assert torch.equal(ghost(x), plain(x))
    for key, value in plain.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value), key


@pytest.mark.parametrize("n", [1, 3, 16])
def test_eval_uses_running_statistics_whatever_the_batch_size(n):
    ghost, plain = bnlab.BatchNorm2d(3, virtual_batch_size=4), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for layer in (ghost, plain):
            layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            layer.running_var.copy_(torch.tensor([2.0, 0.5, 3.0]))
    ghost.eval()
    plain.eval()
    x = torch.randn(n, 3, 4, 4)
    assert_close(ghost(x), plain(x), 2e-6, "eval output")


def test_gradcheck_float64_with_a_ragged_last_ghost_batch():
    layer = _layer((5, 2, 3), virtual_batch_size=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_degenerate_ghost_batch_is_refused_by_name():
    layer = bnlab.BatchNorm1d(3, virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(torch.randn(5, 3))  # the last ghost batch would hold a single sample of a (N, C) input
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_virtual_batch_size_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnlab.BatchNorm1d(3, virtual_batch_size=bad)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_inputs_follow_the_reference(dtype, tol):
    layer = _layer((6, 3, 4), dtype=torch.float32, virtual_batch_size=4)
    x = (torch.randn(6, 3, 4) * 2 + 1).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y_ref, _, _ = vref.ghost_forward_train(to_np(x), to_np(layer.weight), to_np(layer.bias), layer.eps, 4)
    assert_close(y, y_ref, tol, f"{dtype}")
