"""The CPU backend's training Function called without torch's Python wrapper (cpu_autograd.apply_train).

apply_train calls the C++ Function.apply directly when the wrapper would do nothing (no functorch
transform active, not under torch.compile) and the public CpuTrainFunction.apply otherwise. Both
must give the same graph: outputs, running statistics and every gradient equal to the bit.
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import _fastpath
from bnlab.backends import autograd_apply, cpu_autograd, get_backend

CPU = get_backend("cpu")


def _step(apply, x, layer, dy):
    """One training step through `apply`: (y, dx, dweight, dbias, running_mean, running_var)."""
    x = x.detach().requires_grad_(True)
    config = (layer.eps, CPU, layer.running_mean, layer.running_var, layer.momentum, layer.num_batches_tracked, True)
    y = apply(x, layer.weight, layer.bias, config)
    assert type(y.grad_fn).__name__ == "CpuTrainFunctionBackward"
    grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    return (y, *grads, layer.running_mean.clone(), layer.running_var.clone())


@pytest.mark.parametrize("shape", [(256, 100), (4, 3, 5, 5)])
def test_direct_apply_equals_the_public_apply(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    layers = [bnlab.BatchNorm1d(shape[1]) if len(shape) == 2 else bnlab.BatchNorm2d(shape[1]) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
    direct = _step(cpu_autograd.apply_train, x, layers[0], dy)
    public = _step(cpu_autograd.CpuTrainFunction.apply, x, layers[1], dy)
    for a, b in zip(direct, public):
        assert torch.equal(a, b)
    assert int(layers[0].num_batches_tracked) == int(layers[1].num_batches_tracked) == 1


@pytest.mark.parametrize("hook", ["_TRANSFORMS_ACTIVE", "_COMPILING"])
def test_functorch_transforms_and_compiling_take_the_public_apply(monkeypatch, hook):
    calls = []
    public = cpu_autograd.CpuTrainFunction.apply

    def spy(*args):
        calls.append(len(args))
        return public(*args)

    monkeypatch.setattr(cpu_autograd.CpuTrainFunction, "apply", spy)
    layer = bnlab.BatchNorm1d(6)
    x = torch.randn(8, 6, requires_grad=True)
    # The Python path, where apply_train runs (the compiled training call checks the real
    # transforms and tracer itself: tests/test_backend_cpu_train_entry.py).
    with _fastpath.python_path_only():
        layer(x)
        assert calls == []  # the direct path: the public apply was not called
        monkeypatch.setattr(autograd_apply, hook, lambda: True)
        y = layer(x)
    assert calls == [4] and type(y.grad_fn).__name__ == "CpuTrainFunctionBackward"
