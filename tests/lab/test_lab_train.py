"""The shared training loop, evaluation and batch iterators."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.lab.experiments.resnet import _crop_flip
from bnlab.lab.train import evaluate, index_batches, tensor_batches, train_loop


def test_index_batches_cover_each_example_once_per_epoch():
    gen = torch.Generator().manual_seed(0)
    it = index_batches(10, 3, gen)
    epoch = torch.cat([next(it) for _ in range(3)])  # 3 batches of 3; the 10th example is dropped
    assert len(set(epoch.tolist())) == 9


def test_evaluate_in_train_mode_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), bnlab.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    loss, acc = evaluate(model, x, y, batch_size=5, train_mode=True)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        model.train()
        expected = torch.cat([model(x[i : i + 5]) for i in range(0, 20, 5)])
        model.eval()
    assert math.isclose(loss, float(F.cross_entropy(expected, y)), rel_tol=1e-5)
    assert acc == int((expected.argmax(1) == y).sum()) / 20
    # The manual train-mode pass did move the running statistics: evaluate() must have restored them.
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])


def test_train_loop_stops_when_the_loss_is_not_finite_and_evaluates():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = tensor_batches(torch.randn(12, 3), torch.randint(0, 2, (12,)), 4, torch.Generator().manual_seed(1))
    calls, evals = [], []

    def loss_fn(out, y):
        calls.append(1)
        return F.cross_entropy(out, y) * (math.nan if len(calls) == 3 else 1.0)

    losses = train_loop(model, opt, batches, 10, loss_fn=loss_fn, eval_every=2, on_eval=evals.append)
    assert len(losses) == 3 and math.isnan(losses[-1])
    assert evals == [2, 3]


def test_crop_flip_returns_windows_of_the_padded_image():
    x = torch.arange(2 * 1 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    out = _crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for n in range(2):
        windows = [padded[n, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(2)) for w in windows)
