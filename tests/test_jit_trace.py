"""bnlab's layers under torch.jit.trace: the traced model computes BN for every input.

torch.jit.trace records the torch operators a call runs (TorchScript deployment, and the
TorchScript-based torch.onnx.export). An output bnlab's kernels wrote through a raw pointer would
enter the trace as a constant: the traced model returned the example's output for any input, with
no error (an eval-mode ResNet block was off by 3.6 on a new input). Oracle: the eager layer (a
twin with the same state) on inputs the trace never saw; in evaluation mode the trace must hold
torch's aten::batch_norm, the operator ONNX (BatchNormalization) and TorchScript's optimizations
know.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab.functional import batch_norm
from conftest import TOLERANCE, assert_close, randomize_state_

F32 = TOLERANCE[torch.float32]


def _trace(fn, example):
    with warnings.catch_warnings():  # the tracer's own notes (data-dependent Python values, ...)
        warnings.simplefilter("ignore")
        return torch.jit.trace(fn, example, check_trace=False)


def _prepared(model: nn.Module, training: bool) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_state_(m)
    return model.train(training)


def _new_inputs(shape, count=3, layout=None):
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(shape, generator=gen) * (1 + 2 * k) + k for k in range(count)]
    return [x.contiguous(memory_format=layout) for x in xs] if layout is not None else xs


def _bn_ops(traced) -> list[str]:
    """The BN operators the trace holds; none of them Python (prim::PythonOp: an autograd Function
    that TorchScript's C++ runtime and the ONNX export cannot run)."""
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "prim::PythonOp" not in kinds
    return [kind for kind in kinds if "batch_norm" in kind]


MODELS = {
    "conv-bn2d-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()), (2, 3, 7, 7)),
    "linear-bn1d": (lambda: nn.Sequential(nn.Linear(5, 6), bnlab.BatchNorm1d(6)), (8, 5)),
    "conv-bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), bnlab.BatchNorm3d(3)), (2, 2, 4, 5, 3)),
    "bn-act-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), bnlab.BatchNormAct2d(4, activation="relu")), (3, 3, 5, 5)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_trace_records_batch_norm_and_follows_new_inputs(name, channels_last):
    make, shape = MODELS[name]
    layout = torch.channels_last if channels_last and len(shape) == 4 else None
    model = _prepared(make(), training=False)
    example, *others = _new_inputs(shape, 4, layout)
    traced = _trace(model, example)
    assert _bn_ops(traced) == ["aten::batch_norm"]
    with torch.no_grad():
        for x in others:
            assert_close(traced(x), model(x), F32, "traced output")
    # with a graph too (fine-tuning a traced model): the gradients follow
    x = others[0].clone().requires_grad_()
    traced(x).square().sum().backward()
    x_eager = others[0].clone().requires_grad_()
    model(x_eager).square().sum().backward()
    assert_close(x.grad, x_eager.grad, F32, "dx")


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_trace_under_no_grad_follows_new_inputs(name):
    """Deployment traces run under no_grad, where an eval call takes bnlab's one compiled call."""
    make, shape = MODELS[name]
    model = _prepared(make(), training=False)
    example, *others = _new_inputs(shape, 3)
    with torch.no_grad():
        traced = _trace(model, example)
        assert _bn_ops(traced) == ["aten::batch_norm"]
        for x in others:
            assert_close(traced(x), model(x), F32, "traced output")


def test_residual_fused_layer_traces():
    layer = _prepared(bnlab.BatchNormAct2d(4, residual=True), training=False)
    x, r = _new_inputs((2, 4, 5, 5), 2)
    traced = _trace(layer, (x, r))
    for k in (2.0, -1.0):
        assert_close(traced(x * k, r + k), layer(x * k, r + k), F32, "traced output")


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnlab.BatchNorm2d(4),
        lambda: bnlab.BatchNorm2d(4, momentum=None),
        lambda: bnlab.BatchNorm2d(4, virtual_batch_size=2),
        lambda: bnlab.BatchNorm2d(4, renorm=True, rmax=1.5, dmax=0.5),
        lambda: bnlab.BatchNormAct2d(4, activation="relu"),
    ],
    ids=["plain", "cumulative", "ghost", "renorm", "bn-act"],
)
def test_training_trace_normalizes_new_batches_and_updates_the_buffers(make):
    layer = _prepared(make(), training=True)
    twin = copy.deepcopy(layer)
    example, *others = _new_inputs((6, 4, 3, 3), 4)
    traced = _trace(layer, example)  # tracing runs the layer once: so does its twin
    twin(example)
    assert _bn_ops(traced) == []  # training: bnlab's formulas in torch ops
    for x in others:
        got, want = traced(x), twin(x)
        assert_close(got, want, F32, "traced output")
        for buf in ("running_mean", "running_var"):
            assert_close(getattr(layer, buf), getattr(twin, buf), F32, buf)
        assert int(layer.num_batches_tracked) == int(twin.num_batches_tracked)
    assert int(layer.num_batches_tracked) == 1 + len(others)


@pytest.mark.parametrize("example_batch", [2, 6])
def test_a_ghost_layer_traced_in_training_says_the_split_is_fixed(example_batch):
    # Traced at a batch no larger than virtual_batch_size, the trace normalized every later batch
    # with whole-batch statistics (0.24 off the eager layer at N = 4), with no word of it.
    layer = bnlab.BatchNorm2d(4, virtual_batch_size=2)
    with pytest.warns(torch.jit.TracerWarning, match=rf"virtual_batch_size: .*batch of {example_batch} sample"):
        torch.jit.trace(layer, torch.randn(example_batch, 4, 3, 3), check_trace=False)
    eval_layer = bnlab.BatchNorm2d(4, virtual_batch_size=2).eval()  # eval does not split: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="(?!virtual_batch_size)")  # the tracer's own notes
        torch.jit.trace(eval_layer, torch.randn(2, 4, 3, 3), check_trace=False)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_functional_form_traces(training):
    torch.manual_seed(1)
    rm, rv, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.rand(3) + 0.5, torch.randn(3)
    twin_rm, twin_rv, rm0 = rm.clone(), rv.clone(), rm.clone()

    def f(x, running_mean, running_var):  # buffers as inputs: a captured tensor would be a constant
        return batch_norm(x, running_mean, running_var, w, b, training, 0.2, 1e-3)

    example, *others = _new_inputs((5, 3, 4), 3)
    traced = _trace(f, (example, rm, rv))
    f(example, twin_rm, twin_rv)  # tracing ran f once
    for x in others:
        assert_close(traced(x, rm, rv), f(x, twin_rm, twin_rv), F32, "traced output")
        assert_close(rm, twin_rm, F32, "running_mean")
        assert_close(rv, twin_rv, F32, "running_var")
    assert torch.equal(rm, rm0) != training  # the traced training calls moved the averages, eval left them
    assert _bn_ops(traced) == ([] if training else ["aten::batch_norm"])


def test_a_negative_running_variance_is_still_an_error_when_tracing():
    layer = _prepared(bnlab.BatchNorm1d(3), training=False)
    with torch.no_grad():
        layer.running_var[1] = -1.0
    with pytest.raises(ValueError, match="running_var"):
        _trace(layer, torch.randn(4, 3))
