"""The case table: bnlab's layers against torch.nn.BatchNorm*d and the float64 reference.

Every case runs a mixed sequence (train, train, eval, train) and compares outputs, gradients of
x, weight and bias, running statistics and num_batches_tracked, for every registered backend
that handles CPU tensors.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab import reference as ref
from conftest import TOLERANCE, assert_close

LAYERS = {2: ("BatchNorm1d",), 3: ("BatchNorm1d",), 4: ("BatchNorm2d",), 5: ("BatchNorm3d",)}
SHAPES = [
    (2, 3),  # smallest batch that trains
    (7, 5),  # primes
    (13, 1),  # one feature
    (1, 4, 3),  # batch of one, L > 1 still trains
    (5, 3, 7),
    (3, 2, 5, 7),
    (2, 3, 1, 1),  # 1x1 spatial
    (0, 3, 4, 4),  # empty batch
    (4, 3, 0, 5),  # empty spatial dim
    (3, 2, 2, 3, 5),
]
CONFIGS = [
    dict(affine=True, track_running_stats=True, momentum=0.1),
    dict(affine=False, track_running_stats=True, momentum=None),
    dict(affine=True, track_running_stats=False, momentum=0.1),
    dict(affine=True, track_running_stats=True, momentum=0.7),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _cases():
    for shape, config, dtype in itertools.product(SHAPES, CONFIGS, DTYPES):
        yield pytest.param(shape, config, dtype, id=f"{shape}-{'-'.join(f'{k[:5]}{v}' for k, v in config.items())}-{str(dtype)[6:]}")


def _pair(shape, config, dtype, seed):
    """A bnlab layer and a torch.nn layer with the same random affine parameters."""
    name = LAYERS[len(shape)][0]
    gen = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # half inputs, fp32 parameters
    ours = getattr(bnlab, name)(shape[1], dtype=param_dtype, **config)
    theirs = getattr(nn, name)(shape[1], dtype=param_dtype, **config)
    if config["affine"]:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(shape[1], generator=gen) + 0.5)
            ours.bias.copy_(torch.randn(shape[1], generator=gen))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("shape,config,dtype", list(_cases()))
def test_layer_matches_torch_and_reference(backend, shape, config, dtype):
    tol = TOLERANCE[dtype]
    ours, theirs = _pair(shape, config, dtype, seed=len(shape))
    gen = torch.Generator().manual_seed(7)
    for step, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step) + step).to(dtype)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours.zero_grad()
        theirs.zero_grad()
        y1, y2 = ours(x1), theirs(x2)
        assert y1.dtype == y2.dtype and y1.shape == y2.shape
        y1.backward(dy)
        y2.backward(dy)
        what = f"step {step} ({mode})"
        assert_close(y1, y2, tol, f"{what} output vs torch")
        assert_close(x1.grad, x2.grad, tol, f"{what} grad x vs torch")
        if config["affine"]:
            assert_close(ours.weight.grad, theirs.weight.grad, tol * max(1, x.numel() ** 0.5), f"{what} grad weight")
            assert_close(ours.bias.grad, theirs.bias.grad, tol * max(1, x.numel() ** 0.5), f"{what} grad bias")
        if config["track_running_stats"]:
            assert_close(ours.running_mean, theirs.running_mean, tol, f"{what} running_mean")
            assert_close(ours.running_var, theirs.running_var, tol, f"{what} running_var")
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
        _check_against_reference(ours, x, dy, y1, x1.grad, mode, tol, what)


def _check_against_reference(layer, x, dy, y, dx, mode, tol, what):
    """The same step in float64 NumPy, from the layer's parameters and (pre-update) buffers."""
    if x.numel() == 0:
        return
    gamma = layer.weight.detach().double().numpy() if layer.affine else None
    beta = layer.bias.detach().double().numpy() if layer.affine else None
    x64 = x.double().numpy()
    if mode == "eval" and layer.track_running_stats:
        expected = ref.forward_eval(x64, layer.running_mean.double().numpy(), layer.running_var.double().numpy(),
                                    gamma, beta, layer.eps)
        assert_close(y, expected, tol, f"{what} output vs reference")
        return
    expected, cache = ref.forward_train(x64, gamma, beta, layer.eps)
    ref_dx, _, _ = ref.backward(dy.double().numpy(), cache)
    assert_close(y, expected, tol, f"{what} output vs reference")
    assert_close(dx, ref_dx, tol, f"{what} grad x vs reference")


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 4, 2, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_and_non_contiguous_inputs(backend, shape, dtype):
    ours, theirs = _pair(shape, CONFIGS[0], dtype, seed=3)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    base = torch.randn(shape, dtype=dtype)
    inputs = {
        "channels_last": base.contiguous(memory_format=fmt),
        "transposed": base.transpose(0, 2).contiguous().transpose(0, 2),  # same values, permuted strides
        "sliced": torch.randn((shape[0], shape[1], shape[2] * 2) + shape[3:], dtype=dtype)[:, :, ::2],
    }
    for name, x in inputs.items():
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn(shape, dtype=dtype)
        y1, y2 = ours(x1), theirs(x2)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        assert_close(y1, y2, TOLERANCE[dtype], f"{name} output")
        assert_close(x1.grad, x2.grad, TOLERANCE[dtype], f"{name} grad x")
    y = ours(inputs["channels_last"])
    assert y.is_contiguous(memory_format=fmt), "channels_last input must give a channels_last output"
    ours.eval()
    assert ours(inputs["channels_last"]).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False])
def test_output_keeps_a_permuted_inputs_layout_where_torch_returns_contiguous(backend, training):
    """docs/conventions.md, *The output's memory layout*: on a dense permuted input (a transposed
    (N, L, C) sequence, channels outermost) bnlab's output and input gradient have the input's
    strides, as torch.empty_like(x) does, where torch.nn's are contiguous; the values agree, and
    reshape (not view) flattens either."""
    gen = torch.Generator().manual_seed(5)
    inputs = {
        "(N, L, C) transposed": torch.randn(4, 9, 6, generator=gen).transpose(1, 2),
        "(C, N) transposed": torch.randn(6, 8, generator=gen).t(),
        "channels outermost": torch.randn(6, 3, 4, 5, generator=gen).transpose(0, 1),
    }
    for name, x in inputs.items():
        ours, theirs = _pair(tuple(x.shape), CONFIGS[0], torch.float32, seed=7)
        ours.train(training), theirs.train(training)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()  # clone keeps the strides
        assert x1.stride() == x.stride() and not x.is_contiguous(), name
        y1, y2 = ours(x1), theirs(x2)
        dy = torch.randn(x.shape, generator=gen)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        assert_close(y1, y2, TOLERANCE[torch.float32], f"{name} output")
        assert_close(x1.grad, x2.grad, TOLERANCE[torch.float32], f"{name} grad x")
        assert y1.stride() == torch.empty_like(x).stride() == x.stride(), (name, y1.stride())
        assert y2.is_contiguous(), f"{name}: torch.nn's output is no longer contiguous; update the docs"
        assert torch.equal(y1.reshape(len(x), -1), y1.contiguous().view(len(x), -1)), name


def test_half_inputs_use_float32_statistics(backend):
    """fp16 data whose squares overflow fp16 (|x| ~ 1e3) must still normalize: statistics are fp32 or better."""
    x = (torch.randn(64, 3) * 300 + 2000).to(torch.float16)
    ours = bnlab.BatchNorm1d(3)
    y = ours(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    expected, _ = ref.forward_train(x.double().numpy())
    assert_close(y, expected, TOLERANCE[torch.float16], "fp16 output")
    assert_close(ours.running_mean, 0.1 * x.double().mean(0), 1e-4, "running_mean from fp16 data")


def test_module_with_bf16_parameters_matches_torch(backend):
    ours = bnlab.BatchNorm2d(4).to(torch.bfloat16)
    theirs = nn.BatchNorm2d(4).to(torch.bfloat16)
    x = torch.randn(3, 4, 5, 5).to(torch.bfloat16)
    for _ in range(2):
        assert_close(ours(x), theirs(x), TOLERANCE[torch.bfloat16], "bf16 output")
    assert ours.running_mean.dtype == torch.bfloat16
    assert_close(ours.running_var, theirs.running_var, TOLERANCE[torch.bfloat16], "bf16 running_var")


def test_bias_false_keyword(backend):
    ours, theirs = bnlab.BatchNorm1d(3, bias=False), nn.BatchNorm1d(3, bias=False)
    assert ours.bias is None and ours.weight is not None
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, requires_grad=True)
    y = ours(x)
    y.pow(2).sum().backward()
    assert_close(y, theirs(x), 2e-4, "bias=False output")
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("variant", ["plain", "ghost", "renorm", "masked"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_a_trainable_bias_beside_a_frozen_weight_gets_its_gradient(backend, variant, create_graph):
    """Guards autograd.param_grads: β's gradient is asked for by β alone, so with γ frozen
    (requires_grad False) β still gets Σdy over N and the spatial positions, and γ nothing."""
    options = {"ghost": dict(virtual_batch_size=2), "renorm": dict(renorm=True)}.get(variant, {})
    layer = bnlab.BatchNorm2d(3, dtype=torch.float64, **options)
    layer.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 5, 6, generator=gen) > 0.4 if variant == "masked" else None
    [grad] = torch.autograd.grad(layer(x, mask=mask), [layer.bias], dy, create_graph=create_graph)
    assert_close(grad, dy.sum((0, 2, 3)), 1e-12, f"{variant} bias grad")
    layer(x, mask=mask).backward(dy)
    assert layer.weight.grad is None
    assert_close(layer.bias.grad, dy.sum((0, 2, 3)), 1e-12, f"{variant} bias.grad")


def test_repr_matches_torch():
    for kwargs in ({}, dict(momentum=None, affine=False, track_running_stats=False), dict(eps=1e-3)):
        assert repr(bnlab.BatchNorm2d(8, **kwargs)) == repr(nn.BatchNorm2d(8, **kwargs))


def test_layers_are_instances_of_torch_classes():
    """isinstance checks in user code (weight-decay exclusion, BN freezing, fusion) keep working."""
    assert isinstance(bnlab.BatchNorm1d(2), nn.BatchNorm1d)
    assert isinstance(bnlab.BatchNorm2d(2), nn.modules.batchnorm._BatchNorm)
    assert isinstance(bnlab.BatchNorm3d(2), nn.BatchNorm3d)


def test_eval_without_running_stats_uses_batch_statistics(backend):
    ours = bnlab.BatchNorm1d(3, track_running_stats=False).eval()
    x = torch.randn(10, 3, dtype=torch.float64)
    assert_close(ours(x), ref.forward_train(x.numpy())[0], 1e-12, "eval output without running stats")


def test_module_defaults_match_torch():
    ours, theirs = bnlab.BatchNorm2d(5), nn.BatchNorm2d(5)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (1e-5, 0.1, True, True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert np.array_equal(list(ours.state_dict().keys()), list(theirs.state_dict().keys()))
