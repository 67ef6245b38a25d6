"""bnlab.freeze / unfreeze: frozen BN layers keep their statistics (and γ/β) through model.train() and training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools.freeze import is_frozen
from features_util import assert_close


def _model(bn=bnlab.BatchNorm2d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Conv2d(4, 2, 3), bn(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():  # non-trivial running statistics, so that eval and train outputs differ
        for layer in (model[1], model[4]):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return model


def _train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("bn", [bnlab.BatchNorm2d, nn.BatchNorm2d])
def test_frozen_statistics_and_affine_survive_train_and_a_step(bn):
    model = _model(bn)
    bnlab.freeze(model[1])  # freeze the first BN only
    frozen_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    free_before = {k: v.clone() for k, v in model[4].state_dict().items()}
    conv_before = model[0].weight.detach().clone()
    x = torch.randn(8, 3, 8, 8)
    _train_step(model, x)
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, frozen_before[key]), f"frozen {key} changed"
    assert not torch.equal(model[4].running_mean, free_before["running_mean"]), "the unfrozen BN did not train"
    assert not torch.equal(model[4].weight, free_before["weight"])
    assert not torch.equal(model[0].weight, conv_before), "the rest of the model did not train"
    assert model[1].training, "outside forward the layer reports the model's mode"


def test_frozen_layer_normalizes_with_running_statistics_in_train_mode():
    model = _model()
    bnlab.freeze(model)
    x = torch.randn(8, 3, 8, 8)
    model.train()
    y_train = model(x)
    y_eval = model.eval()(x)
    assert_close(y_train, y_eval, 1e-6, "frozen model in train mode == eval mode")


def test_affine_false_freezes_statistics_only():
    model = _model()
    bnlab.freeze(model, affine=False)
    stats_before = model[1].running_var.clone()
    weight_before = model[1].weight.detach().clone()
    _train_step(model, torch.randn(8, 3, 8, 8))
    assert torch.equal(model[1].running_var, stats_before)
    assert not torch.equal(model[1].weight, weight_before), "γ should still train with affine=False"


@pytest.mark.parametrize("bn", [bnlab.BatchNorm2d, nn.BatchNorm2d])
def test_affine_false_keeps_a_parameter_the_user_froze_frozen(bn):
    """Guards freeze's requires_grad rule: with affine=False γ and β keep the requires_grad they had
    (a β frozen by the user stays frozen, and γ trains), through freeze, a second freeze and unfreeze."""
    layer = bn(3)
    layer.bias.requires_grad_(False)
    for affine in (False, False, True, False):  # freezing a frozen layer again only updates affine
        bnlab.freeze(layer, affine=affine)
        assert layer.weight.requires_grad == (not affine) and not layer.bias.requires_grad
    bnlab.unfreeze(layer)
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_unfreeze_restores_training_behaviour_and_requires_grad():
    model = _model()
    model[4].bias.requires_grad_(False)  # a user choice that unfreeze must not override
    bnlab.freeze(model)
    assert is_frozen(model[1]) and not model[1].weight.requires_grad
    bnlab.unfreeze(model)
    assert not is_frozen(model[1]) and model[1].weight.requires_grad and not model[4].bias.requires_grad
    before = model[1].running_mean.clone()
    _train_step(model, torch.randn(8, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, before)
    assert int(model[1].num_batches_tracked) == 1


def test_deepcopy_of_a_frozen_model_is_frozen_independently():
    model = _model()
    bnlab.freeze(model)
    clone = copy.deepcopy(model)
    bnlab.unfreeze(clone)
    x = torch.randn(8, 3, 8, 8)
    before = model[1].running_mean.clone()
    model.train()(x)
    assert torch.equal(model[1].running_mean, before), "unfreezing the copy unfroze the original"
    clone.train()(x)
    assert not torch.equal(clone[1].running_mean, before)


def test_mode_is_restored_when_the_forward_raises():
    layer = bnlab.BatchNorm2d(4)
    bnlab.freeze(layer)
    layer.train()
    with pytest.raises(ValueError):
        layer(torch.randn(2, 3, 4, 4))  # wrong channel count
    assert layer.training


def test_freeze_checks_its_arguments():
    with pytest.raises(TypeError, match="model"):
        bnlab.freeze("not a model")
    with pytest.raises(TypeError, match="affine"):
        bnlab.freeze(_model(), affine="yes")


@pytest.mark.parametrize("convert", ["to torch", "to bnlab", "sync"])
def test_a_conversion_keeps_the_freeze(convert):
    # bnlab.convert and convert_sync_batchnorm rebuild each layer; the freeze (its hooks on the old
    # layer) had been lost: the new layers updated their statistics again under model.train().
    model = _model(nn.BatchNorm2d if convert == "to bnlab" else bnlab.BatchNorm2d)
    bnlab.freeze(model)
    if convert == "sync":
        model = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = bnlab.convert(model, to=convert.split()[-1])
    layers = [model[1], model[4]]
    assert all(is_frozen(layer) for layer in layers)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    _train_step(model, torch.randn(5, 3, 8, 8))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(not p.requires_grad for layer in layers for p in layer.parameters())
    bnlab.unfreeze(model)
    assert all(p.requires_grad for layer in layers for p in layer.parameters())
    _train_step(model, torch.randn(5, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
