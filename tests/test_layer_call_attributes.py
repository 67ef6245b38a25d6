"""The compiled calls read a layer's attributes as Python does, and make outputs as torch does.

The compiled whole calls read about ten attributes of the layer per call (mode, eps, options,
momentum, ...). They keep, per version of the layer's type, what each name resolves to there and
then read the instance's dict (backends/cpu_kernels_py_attrs.inc); wherever the type could make
Python's answer differ (a property, a __getattribute__, a class attribute changed later) the answer
must still be Python's. In the torch build they make new tensors without the dispatcher
(cpu_kernels_torch.h): the outputs must be what torch.empty_like would give, in inference mode too.
Each case goes through the compiled layer call itself (``_fastpath.LAYER_CALL``), checked to have
taken it, against torch.nn.functional.batch_norm in float64 with the eps Python reads.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import bnlab
from bnlab import _fastpath
from bnlab.backends import cpu_eval_entry, registered_cpu_backend
from speed_helpers import seeded_layer

pytestmark = pytest.mark.skipif(cpu_eval_entry() is None, reason="the CPU kernels' extension module did not build")


def _compiled_call(layer, x):
    """``layer(x)`` through the compiled layer call, which must take it (not decline)."""
    with torch.no_grad():
        bnlab.BatchNorm1d(2).eval()(torch.randn(3, 2))  # sets the compiled call up
        y = _fastpath.LAYER_CALL["call"](layer, x)
    assert isinstance(y, torch.Tensor), f"the compiled call declined: {y!r}"
    return y


def _layer(cls, channels=3, training=False):
    return seeded_layer(cls, channels, training, var=(0.01, 0.05))  # small variances: eps moves the output


def _expected_eval(layer, x, eps):
    """The eval output with the running statistics and ``eps``, in float64, cast to x's dtype."""
    y = F.batch_norm(x.double(), layer.running_mean.double(), layer.running_var.double(), layer.weight.double(),
                     layer.bias.double(), training=False, eps=eps)  # fmt: skip
    return y.to(x.dtype)


def _check_eval(layer, eps):
    x = torch.randn(8, layer.num_features)
    y = _compiled_call(layer, x)
    torch.testing.assert_close(y, _expected_eval(layer, x, eps), rtol=2e-6, atol=2e-6)


def _with_property(name: str, value: float) -> type:
    """A BatchNorm1d subclass whose ``name`` is a property answering ``value`` (setting it does
    nothing): a data descriptor, which Python reads before the instance's dict."""
    return type(f"_Property_{name}", (bnlab.BatchNorm1d,), {name: property(lambda self: value, lambda self, v: None)})


_PropertyEps = _with_property("eps", 0.25)


def test_a_property_comes_before_the_instance_dict():
    layer = _layer(_PropertyEps).eval()
    layer.__dict__["eps"] = 1e-5  # what a read of the dict alone would take
    assert layer.eps == 0.25
    _check_eval(layer, 0.25)


class _ClassEps(bnlab.BatchNorm1d):
    eps = 0.5


def test_a_class_attribute_changed_after_calls_is_read_anew():
    layer = _layer(_ClassEps).eval()
    del layer.__dict__["eps"]  # the class attribute shows
    _check_eval(layer, 0.5)
    _check_eval(layer, 0.5)
    try:
        _ClassEps.eps = 0.125  # the type's version changes: what it resolved to is looked up again
        _check_eval(layer, 0.125)
        _ClassEps.eps = property(lambda self: 0.0625)  # now a descriptor
        _check_eval(layer, 0.0625)
    finally:
        _ClassEps.eps = 0.5


def test_a_base_class_changed_after_calls_is_read_anew():
    class Base(bnlab.BatchNorm1d):
        eps = 0.5

    class Child(Base):
        pass

    layer = _layer(Child).eval()
    del layer.__dict__["eps"]
    _check_eval(layer, 0.5)
    Base.eps = 0.2  # a base's change gives its subclasses new versions too
    _check_eval(layer, 0.2)


def test_an_instance_attribute_changed_after_calls_is_read_anew():
    layer = _layer(bnlab.BatchNorm1d).eval()
    _check_eval(layer, 1e-5)
    layer.eps = 0.3
    _check_eval(layer, 0.3)


class _GetattributeEps(bnlab.BatchNorm1d):
    """A __getattribute__ of its own, which Python calls for every attribute."""

    def __getattribute__(self, name):
        if name == "eps":
            return 0.4
        return super().__getattribute__(name)


def test_a_getattribute_of_the_class_is_called():
    layer = _layer(_GetattributeEps).eval()
    assert layer.__dict__["eps"] == 1e-5 and layer.eps == 0.4
    _check_eval(layer, 0.4)


def test_a_changed_class_of_the_instance_is_read():
    layer = _layer(bnlab.BatchNorm1d).eval()
    _check_eval(layer, 1e-5)
    layer.__class__ = _PropertyEps
    _check_eval(layer, 0.25)


def test_a_class_attribute_whose_class_gains_get_later_is_read_as_python_reads_it():
    """A tuple subclass's instance as the class's _ranks (the input ranks it takes): its class may
    become a descriptor later, which changes neither the layer's type nor its version tag."""

    class Ranks(tuple):
        pass

    class Sub(bnlab.BatchNorm1d):
        _ranks = Ranks((2, 3))

    layer = _layer(Sub).eval()
    _check_eval(layer, 1e-5)
    Ranks.__get__ = lambda self, obj, objtype=None: (5,)  # now only 5D inputs, as Python reads it
    assert layer._ranks == (5,)
    with torch.no_grad():
        assert _fastpath.LAYER_CALL["call"](layer, torch.randn(8, 3)) is NotImplemented
        with pytest.raises(ValueError, match="5D"):
            layer(torch.randn(8, 3))


@pytest.mark.parametrize("mro_kept", [True, False], ids=["metaclass_mro", "metaclass_mro_deleted"])
def test_a_class_in_a_custom_mro_changed_after_calls_is_read_anew(mro_kept):
    """A metaclass's mro() may name a class that is not a base; CPython does not pass its changes
    on to the layer type's version tag (up to 3.12). The class keeps that MRO after the metaclass
    loses its mro()."""

    class Defaults:
        eps = 0.5

    class Meta(type(bnlab.BatchNorm1d)):
        def mro(cls):
            order = super().mro()
            return [order[0], Defaults, *order[1:]]

    class WithDefaults(bnlab.BatchNorm1d, metaclass=Meta):
        pass

    if not mro_kept:
        del Meta.mro
    assert WithDefaults.__mro__[1] is Defaults
    layer = _layer(WithDefaults).eval()
    del layer.__dict__["eps"]
    _check_eval(layer, 0.5)
    Defaults.eps = 0.125
    sys._clear_type_cache()  # CPython's own cache of the old answer goes; a record kept it
    assert layer.eps == 0.125
    _check_eval(layer, 0.125)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_profile_shows_the_new_tensors_as_the_python_path_does(training):
    """While a profiler records, outputs are made through the dispatcher: aten::empty* events."""
    layer = _layer(bnlab.BatchNorm2d, training=training)
    x = torch.randn(4, 3, 5, 6)
    _compiled_call(layer, x)

    def made(python_path: bool) -> list:
        with torch.no_grad(), torch.autograd.profiler.profile() as profile:
            if python_path:
                with _fastpath.python_path_only():
                    layer(x)
            else:
                assert isinstance(_fastpath.LAYER_CALL["call"](layer, x), torch.Tensor)
        return sorted(e.name for e in profile.function_events if e.name.startswith("aten::empty"))

    compiled = made(False)
    assert "aten::empty_like" in compiled
    assert set(compiled) <= set(made(True))


def test_a_training_call_reads_a_property_momentum():
    layer = _layer(_with_property("momentum", 0.75), training=True)
    layer.__dict__["momentum"] = 0.1
    before = layer.running_mean.clone()
    x = torch.randn(16, 3)
    _compiled_call(layer, x)
    expected = 0.25 * before + 0.75 * x.double().mean(0).float()
    torch.testing.assert_close(layer.running_mean, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_outputs_are_as_torch_nn_makes_them(inference, training):
    """Inference tensors under torch.inference_mode, plain ones under no_grad, as torch.nn's."""
    layer, reference = _layer(bnlab.BatchNorm2d, training=training), torch.nn.BatchNorm2d(3).train(training)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 5, 6)
    context = torch.inference_mode() if inference else torch.no_grad()
    with context:
        y = _fastpath.LAYER_CALL["call"](layer, x)
        expected = reference(x)
    assert isinstance(y, torch.Tensor)
    assert (y.is_inference(), y.requires_grad, y.stride(), y.dtype) == (
        expected.is_inference(), expected.requires_grad, expected.stride(), expected.dtype)  # fmt: skip
    if not inference:
        assert y._version == expected._version == 0
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("strides", [(999, 30, 6, 1), (7, 1, 18, 3)], ids=["nchw", "channels_last"])
def test_an_input_with_an_odd_stride_on_a_size_one_dim_gets_empty_likes_strides(strides):
    x = torch.randn(400).as_strided((1, 3, 5, 6), strides)
    layer = _layer(bnlab.BatchNorm2d).eval()
    y = _compiled_call(layer, x)
    assert y.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(y, _expected_eval(layer, x, layer.eps), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_ab_switches_change_no_bit(training):
    """benchmarks/layer_call_ab.py's four settings give the same outputs and running statistics."""
    switches = registered_cpu_backend().kernels().bn_ab_switches
    x = torch.randn(32, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    results = []
    try:
        for setting in ((True, True), (False, True), (True, False), (False, False)):
            switches(*setting)
            layer = _layer(bnlab.BatchNorm2d, channels=5, training=training)
            y = _compiled_call(layer, x)
            results.append((y, y.stride(), layer.running_mean.clone(), layer.running_var.clone()))
    finally:
        switches(True, True)
    for y, stride, mean, var in results[1:]:
        assert stride == results[0][1]
        for a, b in zip((y, mean, var), results[0][::2] + results[0][3:]):
            assert torch.equal(a, b)
    with pytest.raises(TypeError, match="attrs_kept"):
        switches(1, True)
