"""Layers whose parameters or buffers torch.nn.utils.prune or parametrize has taken over.

Both utilities move the tensor out of the layer's ``_parameters`` / ``_buffers`` dict and serve
the tensor the layer must use as an attribute (prune, recomputed by a forward pre-hook) or a
property (parametrize). bnlab's fast paths read those dicts; before this test they took a missing
weight for ``affine=False`` and normalized without it, so a parametrized layer's output differed
from torch.nn's by the whole scale. They now decline such a layer, and the general path reads the
attributes, as torch.nn does. The oracle is torch.nn.BatchNorm2d with the same parametrization.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import bnlab


class _Doubled(nn.Module):
    """A parametrization that serves twice the stored tensor (so a layer that ignores it is off by 2x)."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return 2 * value


def _take_over(layer: nn.Module, how: str) -> None:
    if how == "prune_weight":
        prune.random_unstructured(layer, "weight", amount=0.5)
    elif how == "parametrize_weight":
        parametrize.register_parametrization(layer, "weight", _Doubled())
    elif how == "parametrize_bias":
        parametrize.register_parametrization(layer, "bias", _Doubled())
    elif how == "parametrize_running_var":
        parametrize.register_parametrization(layer, "running_var", _Doubled())
    else:
        raise AssertionError(how)


def _pair(cls, how: str, training: bool):
    """A bnlab layer of class cls and a torch.nn.BatchNorm2d with the same state and the same takeover."""
    torch.manual_seed(0)
    ours, theirs = cls(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(1, 2)
    theirs.load_state_dict(ours.state_dict())
    for layer in (ours, theirs):
        torch.manual_seed(1)  # prune's random mask: the same for both
        _take_over(layer, how)
        layer.train(training)
    return ours, theirs


TAKEOVERS = ["prune_weight", "parametrize_weight", "parametrize_bias", "parametrize_running_var"]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("how", TAKEOVERS)
def test_a_taken_over_tensor_is_the_one_used(backend, how, training, grad):
    ours, theirs = _pair(bnlab.BatchNorm2d, how, training)
    x = torch.randn(6, 3, 5, 4)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xs = x.contiguous(memory_format=memory_format)
        with torch.set_grad_enabled(grad):
            expected, actual = theirs(xs), ours(xs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("how", ["prune_weight", "parametrize_weight", "parametrize_bias"])
def test_gradients_reach_the_stored_tensors(backend, how):
    ours, theirs = _pair(bnlab.BatchNorm2d, how, training=True)
    x = torch.randn(6, 3, 5, 4)
    dy = torch.randn(6, 3, 5, 4)
    for layer in (ours, theirs):
        (layer(x) * dy).sum().backward()
    stored = {
        "prune_weight": lambda m: m.weight_orig,
        "parametrize_weight": lambda m: m.parametrizations.weight.original,
        "parametrize_bias": lambda m: m.parametrizations.bias.original,
    }[how]
    assert stored(ours).grad is not None
    torch.testing.assert_close(stored(ours).grad, stored(theirs).grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [bnlab.BatchNorm1d, bnlab.SyncBatchNorm], ids=["1d", "sync"])
def test_other_layers_decline_the_same_way(cls):
    torch.manual_seed(0)
    ours, theirs = cls(3), nn.BatchNorm1d(3)
    for layer in (ours, theirs):
        parametrize.register_parametrization(layer, "weight", _Doubled())
        layer.eval()
    with torch.no_grad():
        ours.parametrizations.weight.original.uniform_(0.5, 1.5)
        theirs.parametrizations.weight.original.copy_(ours.parametrizations.weight.original)
    x = torch.randn(8, 3, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
