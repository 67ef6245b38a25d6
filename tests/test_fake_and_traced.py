"""bnlab under torch's tracers outside torch.compile, and with tensors that have no memory.

FakeTensorMode (shape inference, memory estimates), make_fx (graph capture below torch.compile)
and tensor subclasses that handle their operations in Python: bnlab's kernels read memory by
pointer, which such tensors do not have (a FakeTensor's data pointer is 0: a kernel call crashed
the process) and which a tracer does not record (make_fx of a kernel call recorded only the
output's empty_like: its graph replayed garbage). Since the fortieth session such calls take
bnlab's operators (custom_ops: one graph node each, fake implementations for fake tensors) or,
for other subclasses, the portable backend's torch operators (bnlab._memory).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import bnlab
from bnlab import functional
from bnlab.backends.cpu import CpuBackend
from bnlab.backends.triton_backend import TritonBackend

LAYERS = [(bnlab.BatchNorm1d, (6, 4)), (bnlab.BatchNorm1d, (5, 4, 7)), (bnlab.BatchNorm2d, (3, 4, 5, 5)),
          (bnlab.BatchNormAct2d, (3, 4, 5, 5))]  # fmt: skip


def _torch_twin(layer_class):
    return torch.nn.BatchNorm2d if layer_class is bnlab.BatchNormAct2d else getattr(torch.nn, layer_class.__name__)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer_class,shape", LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_under_fake_tensor_mode_a_layer_gives_torch_nns_fake_outputs(layer_class, shape, training):
    with FakeTensorMode():
        ours, theirs = layer_class(shape[1]).train(training), _torch_twin(layer_class)(shape[1]).train(training)
        x = torch.randn(shape, requires_grad=True)
        y, expected = ours(x), theirs(x)
        (dx,) = torch.autograd.grad(y.sum(), [x])
    assert type(y) is FakeTensor and type(dx) is FakeTensor
    assert (y.shape, y.stride(), y.dtype) == (expected.shape, expected.stride(), expected.dtype)
    assert dx.shape == x.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_tensors_used_outside_their_mode_give_fake_outputs(training):
    with FakeTensorMode():
        layer = bnlab.BatchNorm2d(4).train(training)
        x = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last)
    y = layer(x)
    assert type(y) is FakeTensor and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_make_fx_records_the_call_as_bnlabs_operator_and_replays_its_bits(training):
    layer = bnlab.BatchNorm2d(4).train(training)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 4, 5, 5)
    graph = make_fx(lambda t: layer(t))(x)
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("bnlab.") for op in ops), ops
    assert not ops & {"aten.empty_like.default"}, ops  # (what a kernel call left in the graph)
    fresh = bnlab.BatchNorm2d(4).train(training)
    fresh.load_state_dict(layer.state_dict())
    expected = fresh(x)
    assert torch.equal(graph(x), expected)


def test_make_fx_with_fake_tensors_traces_the_functional_call():
    args = (torch.randn(3, 4, 5), torch.zeros(4), torch.ones(4), torch.rand(4) + 0.5, torch.randn(4))

    def f(x, running_mean, running_var, weight, bias):
        return functional.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    graph = make_fx(f, tracing_mode="fake")(*args)
    assert any(str(node.target).startswith("bnlab.") for node in graph.graph.nodes)
    real = [a.clone() for a in args]
    assert torch.equal(graph(*[a.clone() for a in args]), f(*real))


def test_a_fake_parameter_with_a_real_input_is_an_error_naming_the_vectors():
    with FakeTensorMode():
        layer = bnlab.BatchNorm1d(4)
    with pytest.raises(TypeError, match=r"^weight, bias, running_mean, running_var: expected plain tensors"):
        layer(torch.randn(6, 4))


def test_a_subclass_that_leaves_dispatch_to_torch_still_runs_the_kernels():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(6, 4)
    layer = bnlab.BatchNorm1d(4)
    y = layer(x.as_subclass(Tagged))
    assert type(y) is Tagged
    assert torch.equal(y.as_subclass(torch.Tensor), bnlab.BatchNorm1d(4)(x))


def test_the_kernel_backends_decline_tensors_without_memory():
    with FakeTensorMode():
        fake = torch.randn(3, 4)
    assert not CpuBackend().supports(fake) and CpuBackend().supports(torch.randn(3, 4))
    triton = TritonBackend(allow_cpu=True)
    if triton.ops() is not None:  # (triton installed)
        assert not triton.supports(fake)
