"""The batch-size experiment's stacked network is S independent CNNs: checked against S separate ones.

Oracle: the same S networks built as ordinary :class:`CNN` modules and trained one by one with
the same batches and optimizer settings. The stack must give the same outputs, parameters and
running statistics, also after training steps (so seeds cannot leak into each other).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.lab.experiments.batch_size import _params, _units, lr_for, norm_factory, stacked_accuracy, steps_for
from bnlab.lab.experiments.batch_size_net import CNN, WIDTHS, StackedCNN

S = 3

FACTORIES = {
    "bn": lambda c: bnlab.BatchNorm2d(c),
    "torch-bn": lambda c: nn.BatchNorm2d(c),
    "ghost": lambda c: bnlab.BatchNorm2d(c, virtual_batch_size=4),
    "renorm": lambda c: bnlab.BatchNorm2d(c, renorm=True, rmax=2.0, dmax=1.0, renorm_ramp=(1, 3)),
    "gn": lambda c: nn.GroupNorm(c // 4, c),
    "none": None,
}


def _nets(factory):
    nets = []
    for s in range(S):
        torch.manual_seed(100 + s)
        nets.append(CNN(factory).double())
    return nets


@pytest.mark.parametrize("norm", list(FACTORIES))
def test_stack_trains_like_separate_networks(norm):
    factory = FACTORIES[norm]
    singles = _nets(factory)
    stacked = StackedCNN(singles, factory).double()
    singles = [stacked.network(s).double() for s in range(S)]  # fresh copies: the stack copied, not shared
    opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for n in singles]
    opt = torch.optim.SGD(stacked.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(8, S, 14, 14, generator=gen, dtype=torch.float64)  # network s sees its own images
        y = torch.randint(0, 10, (8, S), generator=gen)
        opt.zero_grad()
        logits = stacked(x)
        assert logits.shape == (8, S, 10)
        (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / 8).backward()
        opt.step()
        for s, (net, o) in enumerate(zip(singles, opts)):
            o.zero_grad()
            out = net(x[:, s : s + 1])
            torch.testing.assert_close(logits[:, s].detach(), out.detach(), rtol=1e-9, atol=1e-9)
            F.cross_entropy(out, y[:, s]).backward()
            o.step()
    for s, net in enumerate(singles):
        got = stacked.network(s).state_dict()
        for key, value in net.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-9, msg=f"{norm} network {s} {key}")
    stacked.eval()
    x = torch.randn(5, 1, 14, 14, dtype=torch.float64)
    for s, net in enumerate(singles):
        net.eval()
        torch.testing.assert_close(stacked(x.expand(-1, S, -1, -1))[:, s], net(x), rtol=1e-9, atol=1e-9)


def test_network_copies_options_and_rejects_bad_index():
    factory = FACTORIES["renorm"]
    stacked = StackedCNN(_nets(factory), factory)
    net = stacked.network(1)
    assert net.norms[2].renorm and net.norms[2].renorm_ramp == (1, 3) and net.norms[2].num_features == WIDTHS[-1]
    with pytest.raises(ValueError, match="s: expected a network index in 0..2"):
        stacked.network(3)
    with pytest.raises(ValueError, match="nets"):
        StackedCNN([], factory)


def test_stacked_accuracy_matches_each_network_and_restores_running_stats():
    factory = FACTORIES["bn"]
    stacked = StackedCNN(_nets(factory), factory)
    stacked.train()
    stacked(torch.randn(16, S, 14, 14))  # move the running statistics off their initial values
    before = {k: v.clone() for k, v in stacked.state_dict().items()}
    x, y = torch.randn(40, 1, 14, 14), torch.randint(0, 10, (40,))
    batch_mode = stacked_accuracy(stacked, x, y, 8, train_mode=True)
    for key, value in stacked.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert stacked.training
    for s in range(S):
        net = stacked.network(s).train()
        expected = sum(int((net(x[i : i + 8]).argmax(1) == y[i : i + 8]).sum()) for i in range(0, 40, 8)) / 40
        assert batch_mode[s] == pytest.approx(expected)
        net = stacked.network(s).eval()  # a fresh copy: the train-mode pass above moved this one's running stats
        assert stacked_accuracy(stacked, x, y, 500)[s] == pytest.approx(float((net(x).argmax(1) == y).float().mean()))


def test_protocol_rules():
    p = _params(quick=False)
    assert [lr_for(b, p) for b in (2, 32, 64, 256)] == pytest.approx([0.003125, 0.05, 0.1, 0.1])
    assert [steps_for(b, p) for b in (2, 32, 64, 256)] == [4000, 250, 200, 200]
    units = _units({"params": p})
    assert "ghost,B=16" not in units and "ghost,B=32" in units and "ghost-control,B=2" not in units
    assert len(units) == 6 * 8 - 4 - 1
    layer = norm_factory("renorm", p, 1000, "bnlab")(8)
    assert layer.renorm_ramp == (50, 500) and (layer.rmax, layer.dmax) == (3.0, 5.0)
    assert isinstance(norm_factory("bn", p, 10, "torch")(8), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm"):
        norm_factory("layernorm", p, 10, "bnlab")
