"""bnlab.diagnose: its numbers against direct computations (real train/eval forwards, NumPy statistics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab import reference as ref
from bnlab.tools import diagnosis
from features_util import to_np


def _batches(c=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, 6, generator=gen, dtype=torch.float64) * 2 + 1 for n in (4, 3, 5)]


def _layer(c=3):
    torch.manual_seed(0)
    layer = bnlab.BatchNorm1d(c, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.copy_(torch.linspace(-1, 1, c))
        layer.running_var.copy_(torch.linspace(0.5, 3, c))
    return layer.eval()


def test_output_gap_equals_real_train_and_eval_forwards():
    layer, batches = _layer(), _batches()
    d = bnlab.diagnose(layer, batches, show=False)[""]
    num = den = 0.0
    for x in batches:
        x = x.detach()
        with torch.no_grad():
            y_eval = layer.eval()(x)
            y_train = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, eps=layer.eps)
        num += float((y_eval - y_train).square().sum())
        den += float((y_train - layer.bias.detach().view(1, -1, 1)).square().sum())
    assert abs(d.output_gap - np.sqrt(num / den)) < 1e-10


def test_a_frozen_layer_has_no_gap_and_the_advice_unfreezes_before_recalibrating():
    """A frozen layer trains with its running statistics: its real train/eval gap is 0 (diagnose
    had reported 5.4 here), and recalibrate leaves it, so the advice unfreezes it first."""
    layer, batches = _layer(), _batches()
    bnlab.freeze(layer)
    with torch.no_grad():
        layer.running_mean.add_(3.0)  # stale
        layer.train()
        y_train = torch.cat([layer(x) for x in batches])
        y_eval = torch.cat([layer.eval()(x) for x in batches])
    assert torch.equal(y_train, y_eval)  # (the oracle: what freeze promises)
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert d.output_gap == 0.0
    assert d.advice == ["stale running stats: bnlab.unfreeze, then bnlab.recalibrate", "frozen"]


def test_staleness_and_batch_noise_equal_numpy_statistics():
    layer, batches = _layer(), _batches()
    d = bnlab.diagnose(layer, batches, show=False)[""]
    s = ref.moments(np.concatenate([to_np(x) for x in batches]))
    var = s.m2 / (s.count - 1)
    scale = np.sqrt(var + layer.eps)
    np.testing.assert_allclose(d.population_mean, s.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d.population_var, var, rtol=1e-12)
    np.testing.assert_allclose(d.mean_shift, np.abs(to_np(layer.running_mean) - s.mean) / scale, rtol=1e-10)
    np.testing.assert_allclose(d.var_ratio, (to_np(layer.running_var) + layer.eps) / (var + layer.eps), rtol=1e-10)
    batch_means = np.stack([ref.moments(to_np(x)).mean for x in batches])
    np.testing.assert_allclose(d.batch_noise, np.sqrt(((batch_means - s.mean) ** 2).mean(0)) / scale, rtol=1e-10)
    assert d.samples == s.count
    assert any("recalibrate" in hint for hint in d.advice)


def test_a_recalibrated_layer_is_not_stale():
    layer, batches = _layer(), _batches()
    bnlab.recalibrate(layer, batches, progress=False)
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert d.worst_mean_shift < 1e-10 and abs(d.worst_var_ratio - 1) < 1e-10
    assert not any("recalibrate" in hint for hint in d.advice)


@pytest.mark.parametrize("factor", [0.25, 4.0])
def test_a_running_variance_off_either_way_is_stale(factor):
    """Guards the stale-variance check of diagnosis.advise on both sides: a running variance a
    quarter of the population's (below 1/STALE_VAR) is as stale as one four times it."""
    layer, batches = _layer(), _batches()
    bnlab.recalibrate(layer, batches, progress=False)
    with torch.no_grad():
        layer.running_var *= factor
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert d.worst_mean_shift < 1e-10
    assert abs(d.worst_var_ratio - factor) < 1e-3 * factor
    assert "stale running stats: bnlab.recalibrate" in d.advice


def test_worst_var_ratio_is_the_one_farthest_from_one_on_a_log_scale():
    """Guards LayerDiagnosis.worst_var_ratio: 0.5 (half) is farther from 1 than 1.1 or 1.9, though smaller."""
    d = diagnosis.LayerDiagnosis("", "BatchNorm1d", 3, 10, 0.0, np.zeros(3), np.array([1.1, 0.5, 1.9]), np.zeros(3),
                                 np.zeros(3), np.ones(3), [], [])
    assert d.worst_var_ratio == 0.5 and d.to_dict()["worst_var_ratio"] == 0.5
    assert "stale running stats: bnlab.recalibrate" in diagnosis.advise(d)
    d.var_ratio = np.array([0.9, 1.15, 1.0])  # both within 20 %
    assert d.worst_var_ratio == 1.15 and diagnosis.advise(d) == []
    d.var_ratio = np.array([3.0, 0.25])  # 1/4 is farther from 1 than 3
    assert d.worst_var_ratio == 0.25
    d.var_ratio = np.zeros(0)
    assert d.worst_var_ratio == 1.0


def test_dead_and_eps_dominated_channels_are_found():
    layer = _layer(4)
    batches = _batches(4)
    for x in batches:
        x[:, 1] = 3.0  # constant: a dead channel
        x[:, 2] = x[:, 2] * 1e-3  # variance 4e-6 < eps = 1e-5
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert d.near_zero_var == [1]
    assert d.eps_dominated == [2]


def test_table_data_and_no_side_effects(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 3), bnlab.BatchNorm1d(3, affine=False))
    model.eval()
    batches = [torch.randn(8, 5) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bnlab.diagnose(model, batches)
    out = capsys.readouterr().out
    assert "layer" in out and "mean shift" in out and "\n1 " in out and "\n4 " in out
    assert [d.name for d in result.layers] == ["1", "4"] and result.batches == 3
    json.dumps(result.to_dict())  # plain types only
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"diagnose changed {key}"
    assert not any(m.training for m in model.modules())
    with pytest.raises(KeyError, match="name"):
        result["nope"]


def test_layers_without_running_statistics_report_nan_gaps():
    layer = bnlab.BatchNorm1d(3, track_running_stats=False)
    d = bnlab.diagnose(layer, [torch.randn(4, 3, 5)], show=False)[""]
    assert np.isnan(d.output_gap) and np.isnan(d.mean_shift).all()
    assert np.isfinite(d.population_var).all()


def _direct_gap_and_noise(layer, batches):
    """The gap from real forwards of ``layer`` (a copy, so no state moves) and the scatter of the means it normalizes with."""
    import copy

    num = den = 0.0
    for x in batches:
        train_copy = copy.deepcopy(layer).train()
        with torch.no_grad():
            y_eval = copy.deepcopy(layer).eval()(x)
            y_train = train_copy(x)  # the layer's own training forward: ghost batches, renorm's r and d
        num += float((y_eval - y_train).square().sum())
        den += float((y_train - layer.bias.detach().view(1, -1, 1)).square().sum())
    return np.sqrt(num / den)


@pytest.mark.parametrize("k", [2, 3])
def test_ghost_layer_gap_and_noise_use_its_ghost_batches(k):
    """Training mode of a Ghost BN layer normalizes chunks of k samples: the gap and the batch noise are about those."""
    plain, batches = _layer(), _batches()
    layer = bnlab.BatchNorm1d(3, virtual_batch_size=k, dtype=torch.float64)
    layer.load_state_dict(plain.state_dict())
    layer.eval()
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert abs(d.output_gap - _direct_gap_and_noise(layer, batches)) < 1e-10
    chunks = [c for x in batches for c in x.split(k)]
    s = ref.moments(np.concatenate([to_np(x) for x in batches]))
    scale = np.sqrt(s.m2 / (s.count - 1) + layer.eps)
    means = np.stack([ref.moments(to_np(c)).mean for c in chunks])
    np.testing.assert_allclose(d.batch_noise, np.sqrt(((means - s.mean) ** 2).mean(0)) / scale, rtol=1e-10)
    np.testing.assert_allclose(d.population_mean, s.mean, rtol=0, atol=1e-12)  # the population is the whole data still
    assert d.output_gap > bnlab.diagnose(plain, batches, show=False)[""].output_gap


@pytest.mark.parametrize("step", [0, 5, 100])
def test_renorm_layer_gap_uses_r_and_d_at_its_step(step):
    """Batch Renorm's training output is corrected towards the running statistics: the gap must say so."""
    plain, batches = _layer(), _batches()
    layer = bnlab.BatchNorm1d(3, renorm=True, rmax=1.5, dmax=0.5, renorm_ramp=(2, 10), dtype=torch.float64)
    layer.load_state_dict(plain.state_dict())
    layer.num_batches_tracked.fill_(step)
    layer.eval()
    d = bnlab.diagnose(layer, batches, show=False)[""]
    assert abs(d.output_gap - _direct_gap_and_noise(layer, batches)) < 1e-10
    plain_gap = bnlab.diagnose(plain, batches, show=False)[""].output_gap
    if step == 0:  # before the ramp starts, renorm is plain BN
        assert abs(d.output_gap - plain_gap) < 1e-12
    else:
        assert d.output_gap < plain_gap
