"""bnlab.recalibrate: running statistics become the exact population statistics of the layers' inputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab import reference as ref
from features_util import assert_close, to_np


class ModeProbe(nn.Module):
    """Identity that records the training flag it was called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        bnlab.BatchNorm1d(4), nn.Linear(4, 3), ModeProbe(), nn.BatchNorm1d(3, momentum=None), nn.Dropout(0.5)
    ).double()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-1, 1)
    return model


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3 + 2 for n in (5, 2, 9, 4)]  # uneven sizes


def _expected(model, batches):
    """Population statistics of each BN layer's inputs, computed independently of recalibrate."""
    first = np.concatenate([to_np(x) for x in batches])
    seconds = []
    for x in batches:
        # The first BN normalizes each batch with that batch's statistics, as in training.
        y, _ = ref.forward_train(to_np(x), to_np(model[0].weight), to_np(model[0].bias), model[0].eps)
        seconds.append(to_np(model[1](torch.from_numpy(y))))
    second = np.concatenate(seconds)
    return [(s.mean, s.m2 / (s.count - 1)) for s in (ref.moments(first), ref.moments(second))]


def test_statistics_are_those_of_the_concatenated_data():
    model, batches = _model(), _batches()
    expected = _expected(model, batches)
    model.eval()
    bnlab.recalibrate(model, batches)
    for layer, (mean, var) in zip((model[0], model[3]), expected):
        assert_close(layer.running_mean, mean, 1e-12, "running_mean")
        assert_close(layer.running_var, var, 1e-12, "running_var (unbiased, batch-size weighted)")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_other_modules_keep_their_mode_and_bn_state_is_restored(mode):
    model, batches = _model(), _batches()
    model.train(mode == "train")
    tracked = [int(model[i].num_batches_tracked) for i in (0, 3)]
    bnlab.recalibrate(model, batches)
    assert model[2].seen == [mode == "train"] * len(batches)
    assert all(m.training == (mode == "train") for m in model.modules())
    assert [int(model[i].num_batches_tracked) for i in (0, 3)] == tracked
    assert model[0].track_running_stats and model[3].track_running_stats


def test_num_batches_limits_the_data():
    model, batches = _model(), _batches()
    expected = _expected(model, batches[:2])
    bnlab.recalibrate(model.eval(), iter(batches), num_batches=2)  # an iterator without len() as well
    assert_close(model[0].running_mean, expected[0][0], 1e-12, "running_mean")
    assert_close(model[3].running_var, expected[1][1], 1e-12, "running_var")


def test_tuple_and_dict_batches_and_no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm is optional: "import tqdm" now fails
    model, batches = _model(), _batches()
    expected = _expected(model, batches)
    bnlab.recalibrate(model.eval(), [(x, torch.zeros(len(x))) for x in batches], progress=True)
    assert_close(model[0].running_mean, expected[0][0], 1e-12, "tuple batches")
    bnlab.recalibrate(model, [{"input": x} for x in batches])
    assert_close(model[3].running_var, expected[1][1], 1e-12, "dict batches")


def test_frozen_layers_are_left_alone():
    model, batches = _model(), _batches()
    bnlab.freeze(model[0])
    before = model[0].running_mean.clone()
    bnlab.recalibrate(model.eval(), batches)
    assert torch.equal(model[0].running_mean, before)
    assert not torch.equal(model[3].running_mean, torch.zeros(3, dtype=torch.float64))


def test_masked_inputs_count_their_selected_positions_only():
    layer = bnlab.BatchNorm1d(2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(3, 2, 6, generator=gen, dtype=torch.float64), torch.rand(3, 6, generator=gen) > 0.4) for _ in range(3)]
    bnlab.recalibrate(layer, batches, forward=lambda model, b: model(b[0], mask=b[1]))
    selected = np.concatenate([to_np(x.permute(0, 2, 1)[m]) for x, m in batches])
    s = ref.moments(selected)
    assert_close(layer.running_mean, s.mean, 1e-12, "running_mean")
    assert_close(layer.running_var, s.m2 / (s.count - 1), 1e-12, "running_var")


def test_a_mask_passed_positionally_counts_its_selected_positions_only():
    """Guards collect.call_mask: layer(x, m) is masked BN as layer(x, mask=m) is, and the pass takes
    the statistics of the selected positions (it had taken every position's for a positional mask)."""
    layer = bnlab.BatchNorm1d(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 3, 8, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    masks = [torch.rand(4, 8, generator=gen) > 0.5 for _ in range(3)]
    for x in xs:
        x[:, :, ::2] += 5.0  # positions that differ, so that counting the unselected ones shows
    bnlab.recalibrate(layer, list(zip(xs, masks)), forward=lambda model, b: model(b[0], b[1]))
    selected = np.concatenate([to_np(x.permute(0, 2, 1)[m]) for x, m in zip(xs, masks)])
    s = ref.moments(selected)
    assert_close(layer.running_mean, s.mean, 1e-12, "running_mean")
    assert_close(layer.running_var, s.m2 / (s.count - 1), 1e-12, "running_var")
    d = bnlab.diagnose(layer, list(zip(xs, masks)), forward=lambda model, b: model(b[0], b[1]), show=False)[""]
    assert d.samples == int(sum(m.sum() for m in masks)) and d.worst_mean_shift < 1e-10


@pytest.mark.parametrize("passed", ["positional", "keyword"])
def test_a_residual_input_is_not_taken_for_a_mask(passed):
    # BatchNormAct2d's second argument is the residual, added after BN: its statistics are those
    # of the first input alone. The hook had read it as a mask (and torch.where refused a float one).
    layer = bnlab.BatchNormAct2d(3, residual=True, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1 for n in (4, 7)]
    if passed == "positional":
        forward = lambda model, x: model(x, -x)  # noqa: E731
    else:
        forward = lambda model, x: model(x, residual=-x)  # noqa: E731
    bnlab.recalibrate(layer, batches, forward=forward)
    s = ref.moments(np.concatenate([to_np(x) for x in batches]))
    assert_close(layer.running_mean, s.mean, 1e-12, "running_mean")
    assert_close(layer.running_var, s.m2 / (s.count - 1), 1e-12, "running_var")
    assert bnlab.diagnose(layer, batches, forward=forward).to_dict()["layers"][0]["samples"] == 11 * 16


def test_empty_data_is_refused_by_name():
    with pytest.raises(ValueError, match="batches"):
        bnlab.recalibrate(_model(), [])
    with pytest.raises(ValueError, match="num_batches"):
        bnlab.recalibrate(_model(), _batches(), num_batches=0)


@pytest.mark.parametrize("tool", [bnlab.recalibrate, bnlab.diagnose], ids=["recalibrate", "diagnose"])
@pytest.mark.parametrize("batches,message", [
    ([torch.randn(4, 2, 5, 5)],
     r"input: expected 3 channels on dim 1 \(num_features=3\), got input of shape \(4, 2, 5, 5\)"),
    (torch.randn(4, 3, 5, 5), r"input: BatchNorm2d expected 4D \(N, C, H, W\) input, got 3D input"),  # iterated by rows
    ([torch.randn(3)], r"input: BatchNorm2d expected 4D \(N, C, H, W\) input, got 1D"),
], ids=["channels", "rows-of-one-tensor", "rank"])
def test_a_wrong_input_names_the_layer_and_what_it_expected(tool, batches, message):
    # the pass read a layer's statistics before the layer's checks: torch.stack's size error or an
    # IndexError came out instead (the forty-ninth session's audit)
    model = nn.Sequential(bnlab.BatchNorm2d(3))
    with pytest.raises(ValueError, match="batches: at BN layer '0': " + message):
        tool(model, batches)
    assert model[0].training and model[0].track_running_stats  # restored


def test_recalibration_repairs_eval_accuracy_drift():
    """The point of it all: after recalibration eval outputs match a full-batch train-mode pass."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), bnlab.BatchNorm1d(6)).double()
    data = torch.randn(64, 4, dtype=torch.float64) * 2 + 1
    model.eval()
    bnlab.recalibrate(model, list(data.split(16)))
    y_eval = model(data)
    model.train()
    model[1].track_running_stats = False
    y_train = model(data)
    # Only the unbiased n/(n - 1) = 64/63 of running_var separates them: undone exactly here.
    bn = model[1]
    var = model[0](data).var(0, unbiased=False)
    rescaled = (y_train - bn.bias) * torch.sqrt((var + bn.eps) / (var * 64 / 63 + bn.eps)) + bn.bias
    assert_close(y_eval, rescaled, 1e-12, "eval after recalibration vs whole-data batch statistics")
    assert not torch.allclose(y_eval, y_train, rtol=1e-4, atol=0)  # (the factor is there to undo)


@pytest.mark.parametrize("tool", ["recalibrate", "diagnose"])
def test_arguments_that_cannot_work_are_refused_by_name_before_the_pass(tool):
    """A meta model had failed after the whole pass on reading its count; batches=None and a
    forward that is not callable had given Python's own errors."""
    run = getattr(bnlab, tool)
    extra = {"show": False} if tool == "diagnose" else {}
    with torch.device("meta"):
        on_meta = nn.Sequential(bnlab.BatchNorm1d(3))
    with pytest.raises(ValueError, match="model: BN layer '0' is on the meta device"):
        run(on_meta, [torch.randn(4, 3)], **extra)
    model = nn.Sequential(bnlab.BatchNorm1d(3))
    with pytest.raises(TypeError, match="batches: expected an iterable of batches .* got NoneType"):
        run(model, None, **extra)
    with pytest.raises(TypeError, match="forward: expected None or a callable forward\\(model, batch\\), got int 3"):
        run(model, [torch.randn(4, 3)], forward=3, **extra)


@pytest.mark.parametrize("model", [nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)],
                         ids=["no-bn", "untracked"])
def test_recalibrate_says_so_when_there_is_nothing_to_recalibrate(model):
    """It had run the whole pass and returned without a word."""
    ran = []
    with pytest.warns(UserWarning, match="recalibrate: the model has no BN layer to recalibrate"):
        assert bnlab.recalibrate(model, [torch.randn(4, 3)], forward=lambda m, b: ran.append(b)) is model
    assert ran == []
