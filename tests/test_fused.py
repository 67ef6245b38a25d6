"""bnlab.BatchNormAct2d (BN + residual + ReLU) against torch.nn's unfused sequence, on the CPU path.

The fused Triton kernels of the same layer are checked in test_triton.py (interpreter).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from speed_helpers import assert_close, assert_fused_relu_handles_nan_as_torch, make_input, rel_err


def _pair(channels, activation="relu", residual=False, **kwargs):
    ours = bnlab.BatchNormAct2d(channels, activation=activation, residual=residual, **kwargs)
    theirs = nn.BatchNorm2d(channels, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _reference(bn, x, res, activation):
    z = bn(x) + (res if res is not None else 0)
    return torch.relu(z) if activation == "relu" else z


@pytest.mark.parametrize("activation,residual", [("relu", False), ("relu", True), (None, True)])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_sequence_in_training_and_eval(activation, residual, layout, dtype):
    ours, theirs = _pair(5, activation, residual, dtype=dtype)
    for step, mode in enumerate(["train", "train", "eval"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = make_input((6, 5, 7, 4), layout, dtype, seed=step, mean=0.3 * step)
        res = make_input((6, 5, 7, 4), layout, dtype, seed=10 + step) if residual else None
        dy = make_input((6, 5, 7, 4), layout, dtype, seed=20 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        r1 = res.clone().requires_grad_() if residual else None
        r2 = res.clone().requires_grad_() if residual else None
        y1 = ours(x1, r1) if residual else ours(x1)
        y2 = _reference(theirs, x2, r2, activation)
        tol = 2e-4 if dtype == torch.float32 else 1e-9
        assert_close(y1, y2, tol, f"{mode} output")
        assert y1.stride() == x.stride()
        y1.backward(dy)
        y2.backward(dy)
        assert_close(x1.grad, x2.grad, tol, f"{mode} grad x")
        if residual:
            assert_close(r1.grad, r2.grad, tol, f"{mode} grad residual")
        for name in ("weight", "bias"):
            assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, tol, f"{mode} grad {name}")
            getattr(ours, name).grad = getattr(theirs, name).grad = None
        assert_close(ours.running_var, theirs.running_var, tol, f"{mode} running_var")
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_eval_without_grad_and_batch_statistics_when_not_tracking():
    ours, theirs = _pair(4, "relu", False, track_running_stats=False)
    ours.eval()
    theirs.eval()
    x = make_input((5, 4, 3, 3), seed=1)
    with torch.no_grad():
        assert_close(ours(x), torch.relu(theirs(x)), 2e-4, "eval with batch statistics")


def test_nan_through_the_relu_as_torch():
    assert_fused_relu_handles_nan_as_torch()


def test_eval_with_batch_statistics_refuses_one_value_per_channel():
    # track_running_stats=False: eval normalizes with the batch's statistics, which one value per
    # channel cannot give (torch.nn raises the same ValueError)
    layer = bnlab.BatchNormAct2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError):
        nn.BatchNorm2d(3, track_running_stats=False).eval()(torch.randn(1, 3, 1, 1))


def test_state_dict_is_a_batchnorm2d_state_dict():
    ours = bnlab.BatchNormAct2d(3, residual=True)
    plain = nn.BatchNorm2d(3)
    assert list(ours.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(ours.state_dict())
    ours.load_state_dict(nn.BatchNorm2d(3).state_dict())
    assert "activation='relu'" in repr(ours) and "residual=True" in repr(ours)


def test_double_backward():
    layer = bnlab.BatchNormAct2d(3, residual=True, dtype=torch.float64)
    x = make_input((4, 3, 2, 3), dtype=torch.float64, seed=2).requires_grad_()
    res = make_input((4, 3, 2, 3), dtype=torch.float64, seed=3).requires_grad_()
    y = layer(x, res)
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    g.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(lambda x, r: layer(x, r), (x, res))


def test_fold_keeps_the_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), bnlab.BatchNormAct2d(4, dtype=torch.float64))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.train()
    model(x)
    model.eval()
    before = model(x)
    bnlab.fold(model)
    assert isinstance(model[1], nn.ReLU)
    assert rel_err(model(x), before) <= 1e-10


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="activation: expected 'relu' or None, got 'gelu'"):
        bnlab.BatchNormAct2d(3, activation="gelu")
    layer = bnlab.BatchNormAct2d(3, residual=True)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="residual: .*needs it, got None"):
        layer(x)
    with pytest.raises(ValueError, match=r"residual: expected a tensor like the input"):
        layer(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="residual: this layer was built with residual=False"):
        bnlab.BatchNormAct2d(3)(x, x)


def test_masked_positions_get_the_zero_relu_gives_them():
    # Where z = BN(x) + residual <= 0, ReLU's backward gives +0.0, whatever dy there (even NaN);
    # a product dy·mask would give -0.0 for a negative dy and NaN for a NaN.
    gen = torch.Generator().manual_seed(11)
    x, res, dy = (torch.randn(4, 3, 5, 5, generator=gen) for _ in range(3))
    dy[0, 0, 0, :] = float("nan")
    layer = bnlab.BatchNormAct2d(3, residual=True)
    plain = bnlab.BatchNorm2d(3)
    grads = []
    for f in (layer, lambda a, r: torch.relu(plain(a) + r)):
        a, r = x.clone().requires_grad_(True), res.clone().requires_grad_(True)
        f(a, r).backward(dy)
        grads.append(r.grad)
    masked = grads[1] == 0
    assert masked.any() and not torch.signbit(grads[0][masked]).any()
    assert torch.equal(grads[0].view(torch.int32), grads[1].view(torch.int32))
