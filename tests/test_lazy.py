"""bnlab.LazyBatchNorm1d/2d/3d against torch.nn's lazy layers, and bnlab.convert of lazy layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab

CASES = [
    (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, (6, 5)),
    (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, (6, 5, 4)),
    (bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d, bnlab.BatchNorm2d, (4, 5, 3, 3)),
    (bnlab.LazyBatchNorm3d, nn.LazyBatchNorm3d, bnlab.BatchNorm3d, (2, 5, 3, 2, 2)),
]


@pytest.mark.parametrize("ours, theirs, becomes, shape", CASES)
def test_the_first_call_sizes_the_layer_as_torch_nns_does(ours, theirs, becomes, shape):
    mine, ref = ours(momentum=0.3), theirs(momentum=0.3)
    assert mine.has_uninitialized_params() and mine.num_features == 0
    assert isinstance(mine, theirs)  # user code that checks for torch.nn's lazy layer still finds it
    assert list(mine.state_dict()) == list(ref.state_dict())
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mine(xa), ref(xb.float())
    assert type(mine) is becomes and mine.num_features == shape[1]
    assert not mine._forward_pre_hooks  # the lazy hook is gone, as from torch.nn's layer
    torch.testing.assert_close(ya.float(), yb, atol=2e-4, rtol=0)
    g = torch.randn(shape, dtype=torch.float64)
    ya.backward(g)
    yb.backward(g.float())
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-4, rtol=0)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(mine, name).grad, getattr(ref, name).grad, atol=2e-4, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(mine, name), getattr(ref, name), atol=2e-6, rtol=0)


def test_parameters_take_the_dtype_and_device_asked_for():
    layer = bnlab.LazyBatchNorm2d(dtype=torch.float64)
    layer(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert layer.weight.dtype == layer.running_var.dtype == torch.float64 and layer.weight.shape == (3,)


def test_options_survive_the_change_of_class():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    lazy = bnlab.LazyBatchNorm2d(virtual_batch_size=2, bias=False, skip_nonfinite=False)
    sized = bnlab.BatchNorm2d(4, virtual_batch_size=2, bias=False, skip_nonfinite=False)
    torch.testing.assert_close(lazy(x), sized(x), atol=0, rtol=0)
    assert lazy.bias is None and lazy.virtual_batch_size == 2 and lazy.skip_nonfinite is False
    assert repr(lazy) == repr(sized)


def test_a_wrong_first_input_raises_the_layers_error_and_sizes_nothing():
    layer = bnlab.LazyBatchNorm2d()
    with pytest.raises(ValueError, match=r"input: LazyBatchNorm2d expected 4D .* got 2D input of shape \(4, 5\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(TypeError, match="input: expected a floating-point tensor"):
        layer(torch.ones(2, 3, 4, 4, dtype=torch.long))
    assert layer.has_uninitialized_params() and layer.num_features == 0
    layer(torch.randn(2, 3, 4, 4))
    assert type(layer) is bnlab.BatchNorm2d and layer.num_features == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"eps": 0.0}, ValueError, "eps: expected a finite float > 0"),
        ({"momentum": "fast"}, TypeError, "momentum: expected"),
        ({"dtype": torch.int32}, TypeError, "dtype: expected a floating-point dtype"),
        ({"renorm": True, "track_running_stats": False}, ValueError, "renorm"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        bnlab.LazyBatchNorm2d(**kwargs)


def test_a_checkpoint_sizes_the_layer_before_its_first_call():
    saved = nn.BatchNorm2d(7)
    with torch.no_grad():
        saved.running_mean.uniform_(-1, 1)
        saved.running_var.uniform_(0.5, 2)
        saved.weight.uniform_(0.5, 2)
    layer = bnlab.LazyBatchNorm2d()
    layer.load_state_dict(saved.state_dict())
    assert layer.num_features == 7  # torch.nn's lazy layer keeps 0 here
    layer.eval()
    saved.eval()
    x = torch.randn(2, 7, 3, 3)
    torch.testing.assert_close(layer(x), saved(x), atol=2e-6, rtol=0)
    assert type(layer) is bnlab.BatchNorm2d
    with pytest.raises(ValueError, match="input: expected 7 channels"):
        layer(torch.randn(2, 5, 3, 3))


def test_a_layer_with_nothing_to_size_still_learns_its_channel_count():
    layer = bnlab.LazyBatchNorm1d(affine=False, track_running_stats=False)
    x = torch.randn(6, 4)
    y = layer(x)
    assert type(layer) is bnlab.BatchNorm1d and layer.num_features == 4  # torch.nn's: 0
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True), atol=2e-6, rtol=0)


def test_convert_swaps_lazy_layers_that_have_not_run_yet():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d(eps=1e-3), nn.ReLU(), nn.Flatten(), nn.LazyBatchNorm1d()
    )
    weight = model[1].weight
    bnlab.convert(model)
    assert type(model[1]) is bnlab.LazyBatchNorm2d and type(model[4]) is bnlab.LazyBatchNorm1d
    assert model[1].weight is weight and model[1].eps == 1e-3
    model(torch.randn(2, 3, 6, 6))
    # Left as torch.nn's, they would have become torch.nn.BatchNorm2d/1d here.
    assert type(model[1]) is bnlab.BatchNorm2d and type(model[4]) is bnlab.BatchNorm1d
    assert model[1].weight is weight and weight.shape == (8,) and model[4].num_features == 8 * 4 * 4
    back = nn.Sequential(bnlab.LazyBatchNorm1d(momentum=None))
    bnlab.convert(back, to="torch")
    assert type(back[0]) is nn.LazyBatchNorm1d and back[0].momentum is None


def test_convert_keeps_a_checkpoints_channel_count_both_ways():
    model = nn.Sequential(bnlab.LazyBatchNorm2d())
    model[0].load_state_dict(nn.BatchNorm2d(7).state_dict())
    bnlab.convert(model, to="torch")
    assert type(model[0]) is nn.LazyBatchNorm2d and model[0].num_features == 7
    bnlab.convert(model)
    assert type(model[0]) is bnlab.LazyBatchNorm2d and model[0].num_features == 7
    model(torch.randn(2, 7, 3, 3))
    assert type(model[0]) is bnlab.BatchNorm2d and model[0].num_features == 7


@pytest.mark.parametrize("lazy", [bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d])
@pytest.mark.parametrize(
    "tool",
    [
        lambda model, data: bnlab.freeze(model),
        lambda model, data: bnlab.recalibrate(model, data),
        lambda model, data: bnlab.diagnose(model, data),
    ],
    ids=["freeze", "recalibrate", "diagnose"],
)
def test_the_tools_name_a_lazy_layer_that_has_not_run_and_work_once_it_has(lazy, tool):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), lazy(), nn.ReLU())
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    expected = f"model: expected BN layers whose num_features is known, got an uninitialized {lazy.__name__} at '1'"
    with pytest.raises(ValueError, match=expected):
        tool(model, data)
    model(data[0])
    tool(model, data)


@pytest.mark.parametrize("lazy_base_takes_bias", [True, False])
def test_bias_false_on_a_torch_whose_lazy_base_lacks_the_argument(monkeypatch, lazy_base_takes_bias):
    # torch releases before the keyword: the layer drops the bias itself (bnlab.modules).
    from bnlab import modules

    monkeypatch.setattr(modules, "_LAZY_HAS_BIAS_KWARG", lazy_base_takes_bias)
    layer = bnlab.LazyBatchNorm2d(bias=False)
    assert layer.bias is None and "bias" not in layer.state_dict()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), bnlab.BatchNorm2d(3, bias=False)(x), atol=0, rtol=0)
    assert layer.bias is None and layer.weight.shape == (3,)
