"""bnlab.fold: outputs equal (1e-10 in float64) before and after folding, and only foldable BNs go.

Oracle: the same float64 model before folding. Folding into the layer before a BN and into the
layer after it are both covered, including transposed, grouped and padded convolutions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import bnlab
from bnlab.fold import foldable_into_next, foldable_pairs
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
    with pytest.warns(UserWarning, match=r"torch.fx could not trace the model .*adjacent members of nn.Sequential"):
        _check_equal_after_fold(model, x, expect_folded=2)


class _StandardisedConv(nn.Conv2d):
    """A weight-standardised convolution (timm's StdConv2d): its own forward undoes any scaling."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _BNThenReLU(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def _parametrized_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False, dtype=F64)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", _Doubled())
    return conv


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _instance_forward_conv():
    """A convolution whose forward is set on the instance (as accelerate's add_hook_to_module and
    ad-hoc patches do): weight standardisation, which undoes any scaling of the weight."""
    conv = nn.Conv2d(3, 4, 3, bias=False, dtype=F64)

    def standardised(x):
        w = conv.weight
        return torch.nn.functional.conv2d(x, (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True))

    conv.forward = standardised
    return conv


def _pruned_conv():
    conv = nn.Conv2d(3, 4, 3, dtype=F64)
    prune.random_unstructured(conv, "weight", amount=0.3)
    return conv


@pytest.mark.parametrize("make_model,reason", [
    (lambda: nn.Sequential(_parametrized_conv(), nn.BatchNorm2d(4, dtype=F64)), "parametrized"),
    (lambda: nn.Sequential(_pruned_conv(), nn.BatchNorm2d(4, dtype=F64)), "forward hooks"),
    (lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, dtype=F64)),
                           nn.BatchNorm2d(4, dtype=F64)), "parametrized"),
    (lambda: nn.Sequential(_StandardisedConv(3, 4, 3, dtype=F64), nn.BatchNorm2d(4, dtype=F64)), "its own forward"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, dtype=F64), _BNThenReLU(4, dtype=F64)), "its own forward"),
    (lambda: nn.Sequential(nn.BatchNorm2d(3, dtype=F64), _pruned_conv()), "forward hooks"),  # into the next
    (lambda: nn.Sequential(_instance_forward_conv(), nn.BatchNorm2d(4, dtype=F64)), "replaced on the instance"),
], ids=["parametrize", "prune", "weight_norm", "own-forward-conv", "own-forward-bn", "prune-next", "instance-forward"])
def test_layers_computing_otherwise_than_their_tensors_are_left_and_named(make_model, reason):
    # each had folded into outputs 0.4-6.7 off, without a word (the forty-ninth session's audit);
    # the instance's forward, 11.6 off (the fiftieth's)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    model = _calibrated(make_model(), x)
    with pytest.warns(UserWarning, match=f"left unfolded: at '[01]', .*{reason}"):
        _check_equal_after_fold(model, x, expect_folded=0)


def test_a_frozen_bn_still_folds():
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3, dtype=F64), nn.BatchNorm2d(4, dtype=F64)), x)
    bnlab.freeze(model)  # its hooks only switch the mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_equal_after_fold(model, x, expect_folded=1)


def test_unfoldable_bns_are_left_alone():
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    no_stats = nn.BatchNorm2d(5, track_running_stats=False, dtype=F64)
    model = _calibrated(
        nn.Sequential(
            nn.Conv2d(3, 5, 1), no_stats, nn.ReLU(), nn.BatchNorm2d(5), nn.Conv2d(5, 5, 3, padding=1), nn.BatchNorm2d(5)
        ).to(F64),
        x,
    )
    model[5].train()  # a training-mode BN changes with every batch: never folded
    # model[3] -> a conv with zero padding: the padded zeros are not BN outputs
    assert foldable_pairs(model) == [] and foldable_into_next(model) == []
    before = [m for m in model.modules()]
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\) in training mode left unfolded \(5\); call model.eval\(\)"):
        assert bnlab.fold(model) is model
    assert [m for m in model.modules()] == before


def test_folding_a_model_in_training_mode_warns_and_changes_nothing():
    model = nn.Sequential(*[m for i in range(7) for m in (nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))])
    weights = [p.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"7 BatchNorm layer\(s\) in training mode left unfolded \(1, 3, 5, 7, 9 and 2 more\)"):
        bnlab.fold(model)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in eval mode: no warning
        bnlab.fold(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("lazy", [bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d])
def test_a_lazy_layer_not_yet_run_is_named_and_folds_once_it_has(lazy):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), lazy(), nn.ReLU()).eval()
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\) lazy and not yet run left unfolded \(1\); run one"):
        bnlab.fold(model)
    assert isinstance(model[1], lazy)
    x = torch.randn(2, 3, 5, 5)
    model.train()(x)
    model.eval()
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.fold(model)
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


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
    for call in (bnlab.fold, foldable_pairs, foldable_into_next):
        with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got function"):
            call(lambda x: x)


@pytest.mark.parametrize("bn_lib", [nn, bnlab])
@pytest.mark.parametrize(
    "make_layer,bn_name,shape",
    [
        (lambda: nn.ConvTranspose2d(3, 8, 4, stride=2, padding=1), "BatchNorm2d", (5, 3, 6, 6)),  # DCGAN up-block
        (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), "BatchNorm2d", (5, 4, 5, 5)),
        (lambda: nn.ConvTranspose2d(6, 6, 3, groups=6, output_padding=1, stride=2), "BatchNorm2d", (3, 6, 4, 4)),
        (lambda: nn.ConvTranspose1d(4, 9, 5, groups=1, dilation=2), "BatchNorm1d", (5, 4, 11)),
        (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2, stride=2, bias=False), "BatchNorm3d", (2, 4, 3, 4, 3)),
    ],
)
def test_transposed_conv_then_bn_folds_exactly(bn_lib, make_layer, bn_name, shape):
    torch.manual_seed(0)
    layer = make_layer().to(F64)
    x = torch.randn(shape, dtype=F64)
    model = _calibrated(nn.Sequential(layer, getattr(bn_lib, bn_name)(layer.out_channels, dtype=F64), nn.ReLU()), x)
    assert foldable_pairs(model) == [("0", "1")]
    _check_equal_after_fold(model, x, expect_folded=1)


@pytest.mark.parametrize("bn_lib", [nn, bnlab])
@pytest.mark.parametrize(
    "bn_name,make_layer,shape",
    [
        ("BatchNorm1d", lambda: nn.Linear(10, 7), (9, 10)),  # BN on a network's inputs
        ("BatchNorm1d", lambda: nn.Linear(10, 7, bias=False), (9, 10)),
        ("BatchNorm2d", lambda: nn.Conv2d(6, 8, 3, stride=2, dilation=2), (4, 6, 11, 11)),
        ("BatchNorm2d", lambda: nn.Conv2d(6, 4, 3, groups=2, bias=False), (4, 6, 7, 7)),
        ("BatchNorm2d", lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect"), (4, 6, 7, 7)),
        ("BatchNorm2d", lambda: nn.Conv2d(6, 5, 3, padding=2, padding_mode="circular"), (4, 6, 7, 7)),
        ("BatchNorm2d", lambda: nn.Conv2d(6, 5, 1, padding="same"), (4, 6, 7, 7)),
        ("BatchNorm1d", lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="replicate"), (5, 4, 12)),
        ("BatchNorm3d", lambda: nn.Conv3d(4, 6, 2, groups=2), (2, 4, 4, 5, 3)),
    ],
)
def test_bn_then_layer_folds_into_the_layer_exactly(bn_lib, bn_name, make_layer, shape):
    torch.manual_seed(0)
    layer = make_layer().to(F64)
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    x = torch.randn(shape, dtype=F64) * 3 + 2  # inputs far from BN's outputs: the shift matters
    model = _calibrated(nn.Sequential(getattr(bn_lib, bn_name)(channels, dtype=F64), layer, nn.ReLU()), x)
    assert foldable_pairs(model) == [] and foldable_into_next(model) == [("0", "1")]
    _check_equal_after_fold(model, x, expect_folded=1)
    assert isinstance(model[0], nn.Identity) and model[1].bias is not None


def test_into_next_false_keeps_bn_before_a_layer():
    x = torch.randn(6, 5, dtype=F64)
    model = _calibrated(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)).to(F64), x)
    bnlab.fold(model, into_next=False)
    assert isinstance(model[0], nn.BatchNorm1d)
    with pytest.raises(TypeError, match="into_next: expected a bool, got int"):
        bnlab.fold(model, into_next=1)


class _Tabular(nn.Module):
    """BN on the inputs, then Linear -> BN -> Linear -> BN: the first BN folds forward only, the
    others backward, and the middle Linear takes both folds."""

    def __init__(self):
        super().__init__()
        self.bn_in, self.fc1, self.bn1 = bnlab.BatchNorm1d(6), nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 4, bias=False), bnlab.BatchNorm1d(4)

    def forward(self, x):
        return self.bn2(self.fc2(torch.tanh(self.bn1(self.fc1(self.bn_in(x))))))


def test_a_layer_between_two_bns_takes_both_folds():
    x = torch.randn(16, 6, dtype=F64) * 4 - 1
    model = _calibrated(_Tabular().to(F64), x)
    assert foldable_pairs(model) == [("fc1", "bn1"), ("fc2", "bn2")]
    assert foldable_into_next(model) == [("bn_in", "fc1")]
    _check_equal_after_fold(model, x, expect_folded=3)


class _Shared(nn.Module):
    """BN outputs read twice, or by a layer called twice, or a BN with an activation: none fold forward."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.conv_a = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
        self.bn_b, self.conv_b = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
        self.act, self.conv_c = bnlab.BatchNormAct2d(3, activation="relu"), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.bn_a(x)
        h = self.conv_a(a) + a  # bn_a's output also feeds the sum
        h = self.conv_b(self.bn_b(h))
        h = self.conv_b(h)  # conv_b called twice: scaling its inputs' weights would change both calls
        return self.conv_c(self.act(h))


def test_shared_outputs_reused_layers_and_activations_stay():
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    model = _calibrated(_Shared().to(F64), x)
    assert foldable_into_next(model) == []
    assert foldable_pairs(model) == []


def test_bn2d_never_pairs_with_a_linear():
    # a Linear on (N, C, H, W) acts on W: BN2d's channels are not its features, whatever the counts
    x = torch.randn(2, 4, 3, 4, dtype=F64)
    model = _calibrated(nn.Sequential(nn.BatchNorm2d(4), nn.Linear(4, 4), nn.BatchNorm2d(4)).to(F64), x)
    assert foldable_pairs(model) == [] and foldable_into_next(model) == []


def test_untraceable_model_folds_forward_in_sequentials():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))

        def forward(self, x):
            return x[:, :3] if float(x.sum()) > 1e9 else self.body(x)

    x = torch.randn(7, 5, dtype=F64) + 3
    model = _calibrated(Gated().to(F64), x)
    assert foldable_into_next(model) == [("body.0", "body.1")]
    with pytest.warns(UserWarning, match=r"torch.fx could not trace the model .*\('body.0' -> 'body.1'\)"):
        _check_equal_after_fold(model, x, expect_folded=1)


@settings(max_examples=40, deadline=None)
@given(
    transposed=st.booleans(),
    dims=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_conv_sandwiched_between_bns_folds_exactly(
    transposed, dims, groups, per_group, kernel, stride, dilation, padding_mode, bias, seed
):
    """BN -> conv -> BN for random convolutions: the second BN always folds (into the layer before
    it), the first exactly when the conv is not transposed and has no zero padding."""
    torch.manual_seed(seed)
    cin, cout = groups * per_group[0], groups * per_group[1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    if transposed:
        kinds = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        conv = kinds[dims - 1](cin, cout, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias)
        first_folds = False
    else:
        padding = 0 if padding_mode == "zeros" and seed % 2 else 1
        kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        conv = kinds[dims - 1](
            cin, cout, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias, padding=padding, padding_mode=padding_mode
        )
        first_folds = padding == 0 or padding_mode != "zeros"
    size = (7, 6, 5)[dims - 1]
    x = torch.randn(3, cin, *(size,) * dims, dtype=F64) * 2 + 1
    model = _calibrated(nn.Sequential(bn(cin), conv, bn(cout)).to(F64), x)
    _check_equal_after_fold(model, x, expect_folded=1 + first_folds)


class _Tied(nn.Module):
    """Two branches whose layers share one weight (a siamese pair), each followed by its own BN,
    and one BN before a layer tied to another: folding any of them would change the other branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), bnlab.BatchNorm2d(4)
        self.bn_in, self.fc, self.fc_twin = nn.BatchNorm1d(5), nn.Linear(5, 2), nn.Linear(5, 2)
        self.fc_twin.bias = self.fc.bias

    def forward(self, x, v):
        return self.bn_a(self.a(x)) - self.bn_b(self.b(x * 2)), self.fc(self.bn_in(v)) + self.fc_twin(v)


def test_layers_with_tied_weights_are_not_folded():
    x, v = torch.randn(4, 3, 6, 6, dtype=F64), torch.randn(6, 5, dtype=F64) + 2
    model = _Tied().to(F64)
    model.train()
    model(x, v)
    model.eval()
    assert foldable_pairs(model) == [] and foldable_into_next(model) == []
    before = model(x, v)
    bnlab.fold(model)
    after = model(x, v)
    assert all(torch.equal(p, q) for p, q in zip(before, after))


@pytest.mark.parametrize("bn_lib", [nn, bnlab])
def test_a_same_padded_conv_after_a_bn_reads_padded_zeros_and_is_left(bn_lib):
    """Guards fold_math.reads_only_bn_outputs for padding="same": a kernel wider than 1 pads with
    zeros, which the folded layer would read as BN's shift t; only kernel_size=1 (no padding) folds."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=F64) * 3 + 2  # far from BN's outputs: the shift matters
    model = _calibrated(nn.Sequential(bn_lib.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding="same")).to(F64), x)
    assert foldable_pairs(model) == [] and foldable_into_next(model) == []
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.fold(model)
    assert isinstance(model[0], nn.BatchNorm2d)
    assert torch.equal(model(x), before)
    one = _calibrated(nn.Sequential(bn_lib.BatchNorm2d(4), nn.Conv2d(4, 5, 1, padding="same")).to(F64), x)
    assert foldable_into_next(one) == [("0", "1")]
    _check_equal_after_fold(one, x, expect_folded=1)


@pytest.mark.parametrize("trainable", [True, False])
def test_a_bias_that_fold_creates_is_a_parameter_that_trains_as_the_weight(trainable):
    """Guards fold_math._set_bias: a layer without a bias gets one that is a registered Parameter
    with the weight's requires_grad (fine-tuning a folded model trains it; a frozen one stays so)."""
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).to(F64), x)
    model[0].weight.requires_grad_(trainable)
    bnlab.fold(model)
    assert isinstance(model[0].bias, nn.Parameter)
    assert model[0].bias.requires_grad == model[0].weight.requires_grad == trainable
    assert any(p is model[0].bias for p in model.parameters())
    if trainable:
        model(x).sum().backward()
        assert model[0].bias.grad is not None and model[0].bias.grad.shape == (4,)
