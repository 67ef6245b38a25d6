"""Masked BN (forward(x, mask=m)) against BN of the selected elements, the float64 graph-form reference and gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import reference as ref
from bnlab.variants import reference as vref
from bnlab.variants.masked import masked_batch_norm
from features_util import assert_close, to_np


def _affine(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


def test_all_true_mask_is_plain_bn():
    torch.manual_seed(0)
    ours, theirs = bnlab.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    mask = torch.ones(4, 5, 5, dtype=torch.bool)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    y1, y2 = ours(x1, mask=mask), theirs(x2)
    y1.backward(dy)
    y2.backward(dy)
    assert_close(y1, y2, 2e-4, "y")
    assert_close(x1.grad, x2.grad, 2e-4, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, 2e-4, "dgamma")
    assert_close(ours.bias.grad, theirs.bias.grad, 2e-4, "dbeta")
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 2e-6, key)


# NaN and infinities too: the docs say the padding may hold anything (0·NaN in Σdy·x̂ had made
# dweight and every selected dx NaN); create_graph takes the differentiable backward
@pytest.mark.parametrize("padding", [1e6, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("create_graph", [False, True])
def test_selected_elements_get_exactly_bn_of_the_selection(padding, create_graph):
    """Padded sequences (N, C, L): the valid steps are normalized, and trained, as BN over the valid steps alone."""
    torch.manual_seed(1)
    lengths = [7, 3, 5, 1]
    x = torch.randn(4, 3, 7, dtype=torch.float64) * 2 + 1
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (N, L)
    x[~mask.unsqueeze(1).expand_as(x)] = padding  # padding holding garbage must not matter
    ours = _affine(bnlab.BatchNorm1d(3, dtype=torch.float64))
    dense = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    dense.load_state_dict(ours.state_dict())
    selected = x.permute(0, 2, 1)[mask]  # (M, C): the valid steps as a dense batch
    xs = selected.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    dy_sel = torch.randn_like(selected)
    dy = torch.zeros_like(x)
    dy.permute(0, 2, 1)[mask] = dy_sel  # downstream ignores padding: no gradient from it
    y = ours(x1, mask=mask)
    dx, dw, db = torch.autograd.grad(y, (x1, ours.weight, ours.bias), dy, create_graph=create_graph)
    y_dense = dense(xs)
    y_dense.backward(dy_sel)
    assert_close(y.permute(0, 2, 1)[mask], y_dense, 1e-10, "y on the selection")
    assert_close(dx.permute(0, 2, 1)[mask], xs.grad, 1e-10, "dx on the selection")
    assert_close(dw, dense.weight.grad, 1e-10, "dgamma")
    assert_close(db, dense.bias.grad, 1e-10, "dbeta")
    for key, value in dense.state_dict().items():
        assert_close(ours.state_dict()[key], value, 1e-12, key)


@pytest.mark.parametrize("shape", [(6, 3), (5, 2, 7), (3, 4, 3, 5), (2, 2, 2, 3, 3)])
def test_forward_and_backward_match_the_graph_form_reference(shape):
    torch.manual_seed(2)
    layer_cls = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}[len(shape)]
    layer = _affine(layer_cls(shape[1], dtype=torch.float64))
    x = (torch.randn(shape, dtype=torch.float64) * 3 - 1).requires_grad_()
    mask = torch.rand((shape[0],) + shape[2:]) > 0.4
    mask.view(-1)[:2] = True  # at least two selected positions
    dy = torch.randn(shape, dtype=torch.float64)  # non-zero on unselected positions too
    layer(x, mask=mask).backward(dy)
    y_ref, cache = vref.masked_forward_train(to_np(x), mask.numpy(), to_np(layer.weight), to_np(layer.bias), layer.eps)
    dx_ref, dgamma_ref, dbeta_ref = vref.masked_backward(to_np(dy), cache)
    assert_close(layer(x.detach(), mask=mask), y_ref, 1e-10, "y")
    assert_close(x.grad, dx_ref, 1e-10, "dx")
    assert_close(layer.weight.grad, dgamma_ref, 1e-10, "dgamma")
    assert_close(layer.bias.grad, dbeta_ref, 1e-10, "dbeta")


def test_float32_masked_matches_the_reference_far_from_zero():
    x = torch.randn(8, 3, 16) * 0.01 + 1e3
    mask = torch.rand(8, 16) > 0.5
    y, _ = masked_batch_norm(x, mask, None, None, 1e-5)
    y_ref, _ = vref.masked_forward_train(to_np(x), mask.numpy())
    assert_close(y, y_ref, 2e-4, "y at mean 1e3 ± 0.01")


def test_gradcheck_and_gradgradcheck_float64():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5) > 0.3

    def f(x, w, b):
        return masked_batch_norm(x, mask, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_jvp_through_the_double_backward_trick_matches_torch_ops_at_the_padding():
    """torch.autograd.functional.jvp differentiates the backward in dy at dy = 0: the padding's
    finite x must enter that derivative as it is (gradgradcheck draws dy != 0 everywhere, and
    passed while every padded x was taken as 0, which gave 0.17 off at the padding)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) * 2 + 1
    mask = torch.rand(4, 6, generator=gen) > 0.35
    layer = bnlab.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)

    def in_torch_ops(x):
        m = mask.unsqueeze(1).to(x.dtype)
        count = m.sum((0, 2), keepdim=True)
        mean = (x * m).sum((0, 2), keepdim=True) / count
        var = ((x - mean) ** 2 * m).sum((0, 2), keepdim=True) / count
        return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1) + layer.bias.view(1, -1, 1)

    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    _, ours = torch.autograd.functional.jvp(lambda x: layer(x, mask), x, v)
    _, theirs = torch.func.jvp(in_torch_ops, (x,), (v,))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    length=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_running_stats_are_those_of_the_selection(n, c, length, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=gen, dtype=torch.float64) * 2 + 1
    mask = torch.rand(n, length, generator=gen) > 0.5
    layer = bnlab.BatchNorm1d(c, dtype=torch.float64)
    if n * length < 2:
        return
    layer(x, mask=mask)
    selected = to_np(x.permute(0, 2, 1)[mask])
    assert int(layer.num_batches_tracked) == 1  # counted as torch.nn counts any training batch
    if selected.shape[0] < 2:  # fewer than two selected values: no unbiased variance, no update
        assert torch.equal(layer.running_mean, torch.zeros(c)) and torch.equal(layer.running_var, torch.ones(c))
        return
    mean, var, _ = ref.update_running_stats(np.zeros(c), np.ones(c), ref.moments(selected), 0.1)
    assert_close(layer.running_mean, mean, 1e-12, "running_mean")
    assert_close(layer.running_var, var, 1e-12, "running_var")


def test_nan_in_the_padding_does_not_reach_the_statistics():
    x = torch.randn(4, 3, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    x[:, :, 4:] = float("nan")
    layer = bnlab.BatchNorm1d(3)
    y = layer(x, mask=mask)
    assert torch.isfinite(y[:, :, :4]).all() and torch.isfinite(layer.running_mean).all()
    assert int(layer.num_batches_tracked) == 1


def test_an_all_false_mask_normalizes_with_mean_0_and_variance_0_and_leaves_the_averages():
    """Guards masked_moments' clamp of the count: with no position selected the statistics are
    mean 0 and M2 0 (not 0/0 = NaN), so y = x / sqrt(eps) · γ + β, finite; the batch is counted in
    num_batches_tracked (as torch.nn counts any training batch) but leaves the running averages."""
    layer = _affine(bnlab.BatchNorm1d(3, dtype=torch.float64, eps=0.25))
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    y = layer(x, mask=torch.zeros(4, 6, dtype=torch.bool))
    expected = x / 0.5 * layer.weight.view(1, 3, 1) + layer.bias.view(1, 3, 1)
    assert torch.isfinite(y).all()
    assert_close(y, expected.detach(), 1e-15, "output of an all-False mask")
    assert int(layer.num_batches_tracked) == 1
    for key in ("running_mean", "running_var"):
        assert torch.equal(getattr(layer, key), before[key]), key


def test_eval_mode_ignores_the_mask():
    layer = bnlab.BatchNorm1d(3).eval()
    x = torch.randn(4, 3, 6)
    assert torch.equal(layer(x, mask=torch.rand(4, 6) > 0.5), layer(x))


@pytest.mark.parametrize(
    "mask, error",
    [
        (torch.ones(4, 6), TypeError),  # float, not bool
        (torch.ones(4, 3, 6, dtype=torch.bool), ValueError),  # includes the channel dim
        (torch.ones(4, 5, dtype=torch.bool), ValueError),
        ([[True] * 6] * 4, TypeError),
    ],
)
def test_bad_masks_are_refused_by_name(mask, error):
    with pytest.raises(error, match="mask"):
        bnlab.BatchNorm1d(3)(torch.randn(4, 3, 6), mask=mask)


def test_mask_with_ghost_batches_is_refused_by_name():
    with pytest.raises(ValueError, match="mask"):
        bnlab.BatchNorm1d(3, virtual_batch_size=2)(torch.randn(4, 3, 6), mask=torch.ones(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_inputs_follow_the_reference(dtype, tol):
    layer = _affine(bnlab.BatchNorm1d(3))
    x = (torch.randn(5, 3, 6) * 2 + 1).to(dtype).requires_grad_()
    mask = torch.rand(5, 6) > 0.4
    y = layer(x, mask=mask)
    dy = torch.randn(5, 3, 6).to(dtype)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    y_ref, cache = vref.masked_forward_train(to_np(x), mask.numpy(), to_np(layer.weight), to_np(layer.bias), layer.eps)
    dx_ref, _, _ = vref.masked_backward(to_np(dy), cache)
    assert_close(y, y_ref, tol, f"{dtype} y")
    assert_close(x.grad, dx_ref, tol * 4, f"{dtype} dx")
