"""bnlab's layers under torch.jit.script: a TypeError that says what works, the model untouched.

Before, scripting a model with a bnlab layer failed with "Unknown type annotation: 'int | None'"
from inside bnlab. The suggested route for a plain layer is checked too: the converted copy
scripts, and computes the eager model's outputs.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import bnlab
from conftest import TOLERANCE, assert_close


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit itself is deprecated
        return torch.jit.script(model)


@pytest.mark.parametrize(
    "layer,named",
    [
        (lambda: bnlab.BatchNorm2d(4), "a bnlab BatchNorm2d is not TorchScript"),
        (lambda: bnlab.BatchNorm2d(4, virtual_batch_size=2), "BatchNorm2d with virtual_batch_size=2"),
        (lambda: bnlab.BatchNorm2d(4, renorm=True), "with renorm=True"),
        (lambda: bnlab.BatchNorm1d(4, accumulation_steps=3), "with accumulation_steps=3"),
        (lambda: bnlab.BatchNormAct2d(4, activation="relu"), "with activation='relu', residual=False"),
        (lambda: bnlab.SyncBatchNorm(4), "a bnlab SyncBatchNorm is not TorchScript"),
    ],
)
def test_scripting_is_refused_by_name_and_leaves_the_model_alone(layer, named):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer())
    kind = type(model[1])
    with pytest.raises(TypeError, match=re.escape(named)) as err:
        _script(model)
    assert str(err.value).startswith("torch.jit.script: a bnlab ") and "torch.jit.trace" in str(err.value)
    assert ("bnlab.convert" in str(err.value)) == (named == "a bnlab BatchNorm2d is not TorchScript")
    assert type(model[1]) is kind


def test_the_suggested_converted_copy_scripts_and_computes_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(4, 3, 6, 6))  # running statistics from one batch
    model.eval()
    scripted = _script(bnlab.convert(copy.deepcopy(model), to="torch"))
    x = torch.randn(2, 3, 6, 6) * 2
    assert_close(scripted(x), model(x), TOLERANCE[torch.float32], "scripted output")
    assert type(model[1]) is bnlab.BatchNorm2d
