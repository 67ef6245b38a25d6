"""bnlab's layers under torch.fx.symbolic_trace: one call_module node each, as torch.nn's layers.

Before, the tracer went into bnlab's forward with a Proxy, whose input check rejected it, so
symbolic_trace (and the FX tools built on it) failed on any model with a bnlab layer. Oracle: the
model itself; the GraphModule calls the same layers, so a twin of the model and the GraphModule
must agree bit for bit, outputs, gradients and buffers, in training and in evaluation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import bnlab
from bnlab.fx_leaf import is_proxy


class _Block(nn.Module):
    """Every bnlab layer kind, called from forward with their keyword inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bnlab.BatchNorm2d(4, virtual_batch_size=2)
        self.act = bnlab.BatchNormAct2d(4, activation="relu", residual=True)
        self.sync = bnlab.SyncBatchNorm(4)
        self.seq_bn = bnlab.BatchNorm1d(4)

    def forward(self, x, mask):
        h = self.conv(x)
        h = self.act(self.bn(h), residual=h)
        h = self.sync(h)
        seq = h.flatten(2)  # (N, C, L)
        return self.seq_bn(seq, mask=mask)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1, torch.rand(4, 25, generator=gen) > 0.3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_each_layer_is_one_call_module_node_and_the_graph_module_computes_the_model(training):
    torch.manual_seed(0)
    model = _Block()
    twin = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(model)  # shares model's layers
    layers = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    calls = [node.target for node in graph_module.graph.nodes if node.op == "call_module"]
    assert layers == {"bn", "act", "sync", "seq_bn"} and layers <= set(calls)
    assert not [n for n in graph_module.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    graph_module.train(training), twin.train(training)
    for seed in (1, 2, 3):
        x, mask = _inputs(seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = graph_module(xa, mask), twin(xb, mask)
        assert torch.equal(ya, yb)
        ya.square().sum().backward(), yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    for (name, a), (_, b) in zip(graph_module.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_fx_passes_run_on_the_traced_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()).eval()
    graph_module = torch.fx.symbolic_trace(model)
    ShapeProp(graph_module).propagate(torch.randn(2, 3, 6, 6))
    shapes = {node.target: tuple(node.meta["tensor_meta"].shape) for node in graph_module.graph.nodes if node.op == "call_module"}
    assert shapes["1"] == (2, 4, 4, 4)


def test_bnlab_fold_on_a_graph_module():
    """The traced model is an ordinary module again: fold finds its conv -> BN pair."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()).double()
    model(torch.randn(4, 3, 6, 6, dtype=torch.float64))  # running statistics of one batch
    graph_module = torch.fx.symbolic_trace(model.eval())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = graph_module(x)
    bnlab.fold(graph_module)
    torch.testing.assert_close(graph_module(x), before, rtol=1e-12, atol=1e-12)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in graph_module.modules())


def test_tracing_a_layer_alone_names_what_to_do():
    with pytest.raises(TypeError, match=r"trace that model \(e.g. nn.Sequential\(layer\)\), not the layer itself"):
        torch.fx.symbolic_trace(bnlab.BatchNorm2d(3))


def test_plain_tensors_are_not_proxies():
    assert not is_proxy(torch.zeros(1)) and not is_proxy(None)
