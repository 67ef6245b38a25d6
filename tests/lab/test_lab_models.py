"""The lab's torch.nn networks: structure (BN placement, biases, shortcuts, parameter counts) and BN implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.lab.models import MLP, CifarResNet, SmallCNN, batchnorm_layer, resnet20


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_resnet20_has_he_et_al_parameter_count_and_shapes():
    model = resnet20(in_channels=3, num_classes=10)
    # 19 bias-free 3x3 convs (16/32/64 channels), 19 BN layers, a 64->10 linear layer; option A adds nothing.
    assert sum(p.numel() for p in model.parameters()) == 269_722
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    assert len(_bn_modules(model)) == 19 and all(isinstance(m, bnlab.BatchNorm2d) for m in _bn_modules(model))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    stage_out = model.blocks[:4](torch.relu(model.stem_bn(model.stem(torch.randn(2, 3, 32, 32)))))
    assert stage_out.shape == (2, 32, 16, 16)  # the first block of stage 2 subsamples and pads channels


def test_resnet_without_bn_zero_init_blocks_start_as_identity():
    model = resnet20(in_channels=1, batchnorm=False, zero_init_residual=True)
    assert not _bn_modules(model)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    x = torch.rand(2, 16, 8, 8)  # non-negative, like the output of a ReLU
    torch.testing.assert_close(model.blocks[0](x), x)


def test_resnet_depth_is_checked():
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth=21)


@pytest.mark.parametrize("norm,features", [("channel", [16, 32]), ("activation", [16 * 28 * 28, 32 * 14 * 14]), ("none", [])])
def test_small_cnn_normalizations(norm, features):
    model = SmallCNN(norm)
    assert [m.num_features for m in _bn_modules(model)] == features
    assert all((c.bias is not None) == (norm == "none") for c in model.convs)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_per_activation_bn_normalizes_each_position_over_the_batch():
    model = SmallCNN("activation").train()
    x = torch.randn(8, 1, 28, 28)
    conv_out = model.convs[0](x)
    normed = model.norms[0](conv_out.flatten(1)).view_as(conv_out)
    torch.testing.assert_close(normed.mean(0), torch.zeros_like(normed[0]), atol=1e-5, rtol=0)
    # and scaled by each position's own batch variance: torch's batch norm of the (N, C·H·W) view
    expected = torch.nn.functional.batch_norm(conv_out.flatten(1), None, None, training=True).view_as(conv_out)
    torch.testing.assert_close(normed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl,cls", [("bnlab", bnlab.BatchNorm1d), ("torch", nn.BatchNorm1d)])
def test_bn_implementation_switch(impl, cls):
    assert type(batchnorm_layer(impl, 1, 4)) is cls
    model = MLP([6, 5, 5, 3], batchnorm=True, bn_impl=impl, dropout=0.1)
    assert [type(m) for m in _bn_modules(model)] == [cls, cls]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]  # no bias before BN; the output layer keeps it
    with pytest.raises(ValueError, match="bn_impl"):
        batchnorm_layer("keras", 1, 4)
