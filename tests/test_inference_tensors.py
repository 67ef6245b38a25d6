"""Layers whose buffers are inference tensors: built (or loaded) under torch.inference_mode().

Inside that mode a training call updates them as usual. Outside it torch refuses in-place updates
of inference tensors, and torch.nn's training call raises at its ``num_batches_tracked.add_(1)``;
bnlab's kernels, which write the buffers through their pointers, had updated them silently (a
reviewer's reproduction). Now every route (the compiled calls, the Python path, other backends,
the BN + activation and synchronised layers, the feature options) raises the same RuntimeError
before any state moves. Eval calls, and layers without running statistics, update nothing and
work as in torch.nn."""

from __future__ import annotations

import contextlib

import pytest
import torch

import bnlab
from bnlab import _fastpath
from conftest import TOLERANCE, rel_err

REFUSED = "^Inplace update to inference tensor outside InferenceMode is not allowed"


def _state(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _route(route: str):
    """The compiled calls (default), the Python path they decline to, or the portable backend."""
    if route == "python":
        with _fastpath.python_path_only():
            yield
    elif route == "portable":
        bnlab.set_backend("portable")
        try:
            yield
        finally:
            bnlab.set_backend(None)
    else:
        yield


LAYERS = {
    "BatchNorm1d": (lambda: bnlab.BatchNorm1d(4), (8, 4)),
    "BatchNorm2d": (lambda: bnlab.BatchNorm2d(4), (3, 4, 5, 5)),
    "BatchNorm2d channels_last": (lambda: bnlab.BatchNorm2d(4), "cl"),
    "BatchNorm3d momentum=None": (lambda: bnlab.BatchNorm3d(4, momentum=None), (2, 4, 3, 3, 3)),
    "BatchNormAct2d": (lambda: bnlab.BatchNormAct2d(4, activation="relu"), (3, 4, 5, 5)),
    "SyncBatchNorm": (lambda: bnlab.SyncBatchNorm(4), (3, 4, 5, 5)),
    "SyncBatchNormAct2d": (lambda: bnlab.SyncBatchNormAct2d(4), (3, 4, 5, 5)),
    "Ghost BN": (lambda: bnlab.BatchNorm2d(4, virtual_batch_size=2), (4, 4, 3, 3)),
    "Batch Renorm": (lambda: bnlab.BatchNorm1d(4, renorm=True), (8, 4)),
}


def _input(shape) -> torch.Tensor:
    torch.manual_seed(0)
    if shape == "cl":
        return torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last)
    return torch.randn(shape)


@pytest.mark.parametrize("route", ["compiled", "python", "portable"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_training_call_outside_inference_mode_is_refused_with_nothing_changed(name, grad, route):
    make, shape = LAYERS[name]
    with torch.inference_mode():
        layer = make()
    x = _input(shape)
    before = _state(layer)
    with _route(route), torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=REFUSED) as refused:
        layer(x.requires_grad_(grad))
    assert "running_mean, running_var, num_batches_tracked" in str(refused.value)  # which buffers, and the way out
    assert "layer.running_mean = layer.running_mean.clone()" in str(refused.value)
    assert _same_state(before, _state(layer))


@pytest.mark.parametrize("route", ["compiled", "python", "portable"])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d channels_last", "BatchNorm3d momentum=None"])
def test_inside_inference_mode_training_and_outside_it_eval_agree_with_torch_nn(name, route):
    make, shape = LAYERS[name]
    twin_class = {"BatchNorm1d": torch.nn.BatchNorm1d, "BatchNorm2d channels_last": torch.nn.BatchNorm2d,
                  "BatchNorm3d momentum=None": torch.nn.BatchNorm3d}[name]  # fmt: skip
    with torch.inference_mode():
        layer = make()
        twin = twin_class(4, momentum=layer.momentum)
    x = _input(shape)
    with _route(route):
        with torch.inference_mode():
            for _ in range(2):
                y, y_nn = layer(x), twin(x)
                assert rel_err(y, y_nn) <= TOLERANCE[torch.float32]
        assert int(layer.num_batches_tracked) == int(twin.num_batches_tracked) == 2
        for buffer in ("running_mean", "running_var"):
            assert rel_err(getattr(layer, buffer), getattr(twin, buffer)) <= TOLERANCE[torch.float32]
        layer.eval(), twin.eval()
        with torch.no_grad():  # eval reads the inference buffers, outside the mode too
            y, y_nn = layer(x), twin(x)
        assert rel_err(y, y_nn) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("route", ["compiled", "python", "portable"])
def test_without_running_statistics_a_training_call_outside_the_mode_runs(route):
    with torch.inference_mode():
        layer = bnlab.BatchNorm2d(4, track_running_stats=False)
        twin = torch.nn.BatchNorm2d(4, track_running_stats=False)
    x = _input((3, 4, 5, 5))
    with _route(route), torch.no_grad():
        assert rel_err(layer(x), twin(x)) <= TOLERANCE[torch.float32]


def test_normal_buffers_given_outside_the_mode_make_the_layer_trainable():
    # the way out the error names
    with torch.inference_mode():
        layer = bnlab.BatchNorm1d(4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(layer, name, getattr(layer, name).clone())
    with torch.no_grad():  # (the parameters are inference tensors too, which autograd cannot save)
        layer(_input((8, 4)))
    assert int(layer.num_batches_tracked) == 1


def test_accumulated_statistics_are_refused_at_the_first_micro_batch():
    # refused before the statistics are taken, not a call later, when the group would be applied
    with torch.inference_mode():
        layer = bnlab.BatchNorm1d(4, accumulation_steps=2)
    before = _state(layer)
    with torch.no_grad(), pytest.raises(RuntimeError, match=REFUSED):
        layer(_input((8, 4)))
    assert _same_state(before, _state(layer)) and layer.flush_accumulated_stats() is False  # nothing pending


def test_functional_batch_norm_updates_given_inference_tensors_as_torch_s_does():
    # torch.nn.functional.batch_norm's kernel writes such running statistics without a word; the
    # function keeps its signature's behaviour (the refusal is the modules', as torch.nn's)
    x = _input((8, 4))
    with torch.inference_mode():
        ours = (torch.zeros(4), torch.ones(4))
        theirs = (torch.zeros(4), torch.ones(4))
    with torch.no_grad():
        bnlab.functional.batch_norm(x, *ours, None, None, True, 0.1, 1e-5)
        torch.nn.functional.batch_norm(x, *theirs, None, None, True, 0.1, 1e-5)
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) <= TOLERANCE[torch.float32] and not torch.equal(a, torch.zeros(4))
