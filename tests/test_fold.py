"""bnlab.fold: outputs equal (1e-10 in float64) before and after folding, and only foldable BNs go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.fold import foldable_pairs
from speed_helpers import rel_err

F64 = torch.float64


def _calibrated(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters, then switch to eval."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=F64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen, dtype=F64))
        model.train()
        for step in range(steps):
            model(x * (1 + step) + step)
    return model.eval()


def _check_equal_after_fold(model, x, expect_folded: int):
    before = model(x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bnlab.fold(model)
    after = model(x)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn - left == expect_folded
    assert rel_err(after, before) <= 1e-10, f"outputs differ by {rel_err(after, before):.3g} after folding"


@pytest.mark.parametrize("bn_lib", [nn, bnlab])
@pytest.mark.parametrize(
    "make_layer,bn_name,shape",
    [
        (lambda: nn.Conv2d(3, 8, 3, padding=1, bias=True), "BatchNorm2d", (5, 3, 9, 9)),
        (lambda: nn.Conv2d(3, 8, 3, bias=False), "BatchNorm2d", (5, 3, 9, 9)),
        (lambda: nn.Conv2d(4, 8, 3, groups=2, bias=False), "BatchNorm2d", (5, 4, 7, 7)),
        (lambda: nn.Conv2d(6, 6, 3, groups=6), "BatchNorm2d", (5, 6, 7, 7)),  # depthwise
        (lambda: nn.Conv1d(3, 7, 5, stride=2), "BatchNorm1d", (5, 3, 20)),
        (lambda: nn.Conv3d(2, 4, 3, bias=False), "BatchNorm3d", (3, 2, 5, 6, 7)),
        (lambda: nn.Linear(10, 12), "BatchNorm1d", (9, 10)),
        (lambda: nn.Linear(10, 12, bias=False), "BatchNorm1d", (9, 10)),
    ],
)
def test_layer_then_bn_folds_exactly(bn_lib, make_layer, bn_name, shape):
    torch.manual_seed(0)
    layer = make_layer().to(F64)
    bn = getattr(bn_lib, bn_name)(_out(layer), dtype=F64)
    x = torch.randn(shape, dtype=F64)
    model = _calibrated(nn.Sequential(layer, bn, nn.ReLU()), x)
    _check_equal_after_fold(model, x, expect_folded=1)
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None


def _out(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class _Block(nn.Module):
    """A ResNet-style block: modules called from forward, not in a Sequential; one foldable pair
    (conv1 -> bn1) and one that is not (conv2's output also feeds the residual branch)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), bnlab.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(h)
        return torch.relu(self.bn2(z) + z)


def test_traced_model_folds_only_layers_whose_output_feeds_the_bn_alone():
    x = torch.randn(3, 4, 6, 6, dtype=F64)
    model = _calibrated(_Block().to(F64), x)
    assert foldable_pairs(model) == [("conv1", "bn1")]
    _check_equal_after_fold(model, x, expect_folded=1)


class _Untraceable(nn.Module):
    """Control flow on values defeats torch.fx: folding falls back to nn.Sequential adjacency."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 5, 1), bnlab.BatchNorm2d(5))

    def forward(self, x):
        if float(x.mean()) > 100:
            return x
        return self.body(x)


def test_untraceable_model_falls_back_to_sequential_adjacency():
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    model = _calibrated(_Untraceable().to(F64), x)
    _check_equal_after_fold(model, x, expect_folded=2)


def test_unfoldable_bns_are_left_alone():
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    no_stats = nn.BatchNorm2d(5, track_running_stats=False, dtype=F64)
    model = _calibrated(
        nn.Sequential(nn.Conv2d(3, 5, 1), no_stats, nn.ReLU(), nn.BatchNorm2d(5), nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5)).to(F64),
        x,
    )
    model[5].train()  # a training-mode BN changes with every batch: never folded
    assert foldable_pairs(model) == []
    before = [m for m in model.modules()]
    assert bnlab.fold(model) is model and [m for m in model.modules()] == before


def test_float32_model_stays_close_and_reused_layer_is_not_folded():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = _calibrated(nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3)), torch.randn(2, 3, 5, 5))
    # conv is called twice: scaling its weights for one BN would change the other call.
    assert foldable_pairs(model) == []
    single = _calibrated(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), torch.randn(2, 3, 7, 7))
    x = torch.randn(2, 3, 7, 7)
    before = single(x)
    bnlab.fold(single)
    assert rel_err(single(x), before) < 1e-5


def test_fold_rejects_a_non_module():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        bnlab.fold(lambda x: x)
