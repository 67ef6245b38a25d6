"""The compiled layer call's route for plain calls the CPU kernels do not take (bn_device_call).

When ``layer(x)`` is plain but x is a GPU tensor, or a backend other than the CPU one is chosen,
the compiled layer call (backends/cpu_kernels_py_device.inc) validates the call with the C API
and calls ``_fastpath.device_eval`` / ``device_train`` itself, which pick the backend and call its
whole-call hook. It must make exactly the call ``module_forward`` would make, or decline.

Without a GPU the route is reached with CPU tensors and a spy backend chosen instead of the CPU
one. The spy records each hook call, who made it (the layer's ``__call__``: the compiled route;
``module_forward``: the Python path) and its arguments, and answers None, so that after the route
the Python path runs too and makes its own call: the two records of one layer call must agree.
"""

from __future__ import annotations

import gc
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import _fastpath, backends
from bnlab.backends import PortableBackend, cpu_eval_entry

pytestmark = pytest.mark.skipif(cpu_eval_entry() is None, reason="the CPU kernels' extension module did not build")


class SpyBackend(PortableBackend):
    """The portable backend, whose whole-call hooks record who called them and with what."""

    name = "spy"

    def __init__(self, answer=None):
        self.calls = []
        self.answer = answer  # what the hooks return (None: the general path runs)

    def _record(self, hook, args):
        # device_eval / device_train is frame 1; frame 2 is its caller: __call__ (the compiled
        # route, called from C) or module_forward (the Python path).
        self.calls.append((sys._getframe(3).f_code.co_name, hook, args))
        return self.answer

    def eval_forward(self, *args):
        return self._record("eval_forward", args)

    def train_forward(self, *args):
        return self._record("train_forward", args)


@pytest.fixture
def spy(monkeypatch):
    with torch.no_grad():
        bnlab.BatchNorm1d(2).eval()(torch.randn(3, 2))  # the layer call's stand-in sets it up
    assert type(_fastpath.LAYER_CALL["call"]).__name__ == "builtin_function_or_method"
    backend = SpyBackend()
    monkeypatch.setattr(backends, "_REGISTRY", [backend, *backends._REGISTRY])
    monkeypatch.setattr(backends, "_PINNED", None)

    def eval_with_graph(*args):  # device_eval's graph case
        backend.calls.append((sys._getframe(2).f_code.co_name, "eval_with_graph", args[:-1]))
        return None

    monkeypatch.setattr(_fastpath, "eval_with_graph", eval_with_graph)
    return backend


def _same(a, b) -> bool:
    """Tensors by identity, everything else by type and value (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _call(layer, x):
    try:
        return layer(x)
    except (ValueError, RuntimeError, TypeError):
        return None  # the general path's error: the records are what is compared


_CLASSES = {0: bnlab.BatchNorm1d, 1: bnlab.BatchNorm1d, 2: bnlab.BatchNorm2d, 3: bnlab.BatchNorm3d}


@st.composite
def layer_calls(draw):
    """(layer, x): mostly plain calls, with one unusual thing now and then."""
    # One draw in four takes an unusual value (the last of the range: hypothesis favours small ones).
    unusual = st.integers(0, 3).map(lambda k: k == 3)
    spatial = draw(st.integers(0, 3))  # 0: (N, C); 1: (N, C, L); 2: NCHW; 3: NCDHW
    channels = draw(st.integers(1, 4))
    cls = _CLASSES[spatial]
    options = {}
    if draw(st.integers(0, 9)) == 9:
        options = draw(st.sampled_from([{"virtual_batch_size": 2}, {"renorm": True}, {"accumulation_steps": 2}]))
    tracking = not draw(unusual) or "renorm" in options  # (Batch Renorm requires running statistics)
    layer = cls(channels, affine=draw(st.booleans()), track_running_stats=tracking, **options)
    layer.train(draw(st.booleans()))
    if draw(unusual):
        layer.momentum = draw(st.sampled_from([None, 1, 0, True, math.nan, 0.5]))
    if draw(unusual):
        layer.eps = draw(st.sampled_from([1e-3, 0.0, 1, math.inf]))
    if draw(st.integers(0, 7)) == 7:
        layer.skip_nonfinite = False
    odd = draw(st.integers(0, 21)) - 12  # 0-9: one unusual thing (as above, the last values)
    if odd == 0 and layer.weight is not None:
        layer.weight.requires_grad_(False)
    elif odd == 1 and layer.running_mean is not None:
        layer.running_mean = None  # only one running statistic
    elif odd == 2 and layer.weight is not None:
        layer.weight.data = layer.weight.data.double()  # vectors of another floating dtype are taken
    elif odd == 3 and layer.bias is not None:
        layer.bias.data = torch.zeros(channels + 1)  # not (C,)
    elif odd == 4 and layer.running_var is not None:
        layer.running_var = torch.ones(channels, device="meta")  # on another device
    elif odd == 5 and layer.running_var is not None:
        layer.running_var = torch.ones(channels, dtype=torch.int64)  # not floating
    elif odd == 9:
        layer.track_running_stats = False  # set after construction: the buffers stay, unused
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                  torch.int32]))  # fmt: skip
    batch = draw(st.sampled_from([0, 1, 2, 5]) if draw(unusual) else st.sampled_from([2, 5]))
    shape = (batch, channels + (odd == 6), *[draw(st.integers(1, 3)) for _ in range(spatial)])
    if odd == 7:
        shape = shape + (2,) * (4 - len(shape)) + (2,)  # a rank the class does not take
    x = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    if odd == 8:
        x = x.as_subclass(_Subclass)
    if dtype.is_floating_point and draw(st.booleans()):
        x.requires_grad_()
    return layer, x


class _Subclass(torch.Tensor):
    pass


def test_the_route_makes_exactly_the_call_module_forward_makes_or_none(spy):
    taken = []  # the draws the route took: a property of the route needs some (151 of 400 when written)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(layer_calls(), st.booleans())
    def each_call(call, grad):
        layer, x = call
        spy.calls.clear()
        with torch.set_grad_enabled(grad):
            _call(layer, x)
        routed = [c for c in spy.calls if c[0] == "__call__"]
        python = [c for c in spy.calls if c[0] == "module_forward"]  # (the general path's own calls aside)
        assert len(routed) <= 1 and len(python) <= 1
        if routed:  # the Python path ran after it (the spy answered None) and made the same call
            assert python, "the route took a call module_forward declines"
            (_, hook, args), (_, hook_py, args_py) = routed[0], python[0]
            assert hook == hook_py and len(args) == len(args_py)
            assert all(_same(a, b) for a, b in zip(args, args_py)), (args, args_py)
            taken.append(True)

    each_call()
    assert len(taken) >= 20, f"only {len(taken)} of the drawn calls took the route"


def _toggled_tracking(layer):
    layer.track_running_stats = False  # after construction: the buffers stay, unused in training


def _no_counter(layer):
    layer.momentum, layer.num_batches_tracked = None, None


_STATES = {
    "plain": lambda layer: None,
    "tracking turned off": _toggled_tracking,
    "cumulative average": lambda layer: setattr(layer, "momentum", None),
    "no counter": _no_counter,
    "int momentum": lambda layer: setattr(layer, "momentum", 1),
    "frozen weight": lambda layer: layer.weight.requires_grad_(False),
    "float64 weight": lambda layer: setattr(layer.weight, "data", layer.weight.data.double()),
    "no affine": lambda layer: (setattr(layer, "weight", None), setattr(layer, "bias", None)),
    "guard off": lambda layer: setattr(layer, "skip_nonfinite", False),
}


@pytest.mark.parametrize("state", list(_STATES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_unusual_valid_layer_states_take_the_route_with_module_forwards_arguments(spy, state, training, grad):
    layer = bnlab.BatchNorm2d(3).train(training)
    _STATES[state](layer)
    x = torch.randn(4, 3, 2, 2, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        layer(x)
    routed = [c for c in spy.calls if c[0] == "__call__"]
    python = [c for c in spy.calls if c[0] == "module_forward"]
    assert len(routed) == len(python) == 1, spy.calls
    (_, hook, args), (_, hook_py, args_py) = routed[0], python[0]
    assert hook == hook_py and len(args) == len(args_py)
    assert all(_same(a, b) for a, b in zip(args, args_py)), (args, args_py)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_plain_call_takes_the_route_and_its_answer_is_the_output(spy, training, grad):
    layer = bnlab.BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 2, 2, requires_grad=grad)
    spy.answer = torch.zeros(1)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    hook = "train_forward" if training else ("eval_with_graph" if grad else "eval_forward")
    if hook == "eval_with_graph":  # the stand-in for functional.eval_with_graph answered None
        assert [c[:2] for c in spy.calls] == [("__call__", hook), ("module_forward", hook)]
        return
    assert y is spy.answer
    assert [c[:2] for c in spy.calls] == [("__call__", hook)]  # module_forward never ran
    expected = (
        (x, layer.weight, layer.bias, layer.eps, layer.running_mean, layer.running_var, layer.momentum,
         layer.num_batches_tracked, True)  # fmt: skip
        if training
        else (x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps)
    )
    assert all(_same(a, b) for a, b in zip(spy.calls[0][2], expected))


def test_the_route_follows_the_switch_and_leaves_hooks_and_subclasses_alone(spy):
    layer, x = bnlab.BatchNorm1d(3), torch.randn(8, 3)
    with _fastpath.python_path_only():
        layer(x)
    assert [c[0] for c in spy.calls] == ["module_forward"]
    spy.calls.clear()
    handle = layer.register_forward_hook(lambda *args: None)
    layer(x)
    handle.remove()
    assert [c[0] for c in spy.calls] == ["module_forward"]  # nn.Module.__call__ ran the hook
    spy.calls.clear()

    class Custom(bnlab.BatchNorm1d):
        def forward(self, input):
            return super().forward(input)

    Custom(3)(x)
    assert [c[0] for c in spy.calls] == ["module_forward"]


@pytest.mark.parametrize("transform", ["forward AD", "vmap"])
def test_forward_ad_and_torch_func_transforms_are_left_to_the_python_path(spy, transform):
    import torch.autograd.forward_ad as fwAD

    layer, x = bnlab.BatchNorm1d(3).eval(), torch.randn(8, 3)
    spy.answer = None
    if transform == "forward AD":
        with fwAD.dual_level():
            _call(layer, fwAD.make_dual(x, torch.ones_like(x)))
    else:
        torch.func.vmap(lambda row: _call(layer, row), in_dims=0)(x.unsqueeze(0).expand(2, 8, 3))
    assert [c for c in spy.calls if c[0] == "__call__"] == []


@pytest.mark.parametrize("name", ["weight", "bias", "running_var"])
def test_pruned_or_parametrized_slots_are_left_to_the_python_path(spy, name):
    from torch.nn.utils import parametrize, prune

    layers = [bnlab.BatchNorm1d(3) for _ in range(1 if name == "running_var" else 2)]  # (prune takes parameters)
    parametrize.register_parametrization(layers[0], name, torch.nn.Identity())  # the slot leaves the dict
    if len(layers) == 2:
        prune.l1_unstructured(layers[1], name, amount=1)
    for layer in layers:
        layer(torch.randn(8, 3))
    assert [c for c in spy.calls if c[0] in ("__call__", "module_forward")] == []


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_route_keeps_the_reference_counts_of_what_it_reads(spy, training):
    layer = bnlab.BatchNorm2d(3).train(training)
    # eps and momentum as objects of their own (a literal's float is shared with other code, whose
    # garbage collection moves its count)
    layer.eps, layer.momentum = float("1e-5"), float("0.25")
    x = torch.randn(4, 3, 2, 2)
    spy.answer = torch.zeros(1)
    watched = [x, layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked,
               layer.momentum, layer.eps, spy.answer]  # fmt: skip
    shared = [torch.float32, torch.float64]  # read by every call; others hold them too
    for _ in range(10):
        layer(x)
    spy.calls.clear()
    # Earlier tests' garbage, collected in the middle of the loop, took over 100 references to a
    # dtype with it in one full-suite run: collected first, and no collection while counting.
    gc.collect()
    gc.disable()
    try:
        before, before_shared = [sys.getrefcount(o) for o in watched], [sys.getrefcount(o) for o in shared]
        for _ in range(2000):
            layer(x)
        spy.calls.clear()
        after, after_shared = [sys.getrefcount(o) for o in watched], [sys.getrefcount(o) for o in shared]
    finally:
        gc.enable()
    assert after == before
    assert all(abs(n - m) < 100 for n, m in zip(after_shared, before_shared))  # a leak: +2000


def test_no_momentum_without_a_counter_is_passed_as_zero(spy):
    layer = bnlab.BatchNorm1d(3, momentum=None)
    layer.num_batches_tracked = None
    spy.answer = torch.zeros(1)
    layer(torch.randn(8, 3))
    ((caller, hook, args),) = spy.calls
    assert (caller, hook) == ("__call__", "train_forward")
    assert args[6] == 0.0 and type(args[6]) is float and args[7] is None


def test_a_backend_error_raised_on_the_route_is_the_python_paths_error(spy, monkeypatch):
    layer, x = bnlab.BatchNorm1d(3), torch.randn(8, 3)

    def refuse(*args):
        raise RuntimeError("the backend refuses")

    monkeypatch.setattr(spy, "train_forward", refuse)
    with pytest.raises(RuntimeError, match="the backend refuses"):
        layer(x)
    with _fastpath.python_path_only(), pytest.raises(RuntimeError, match="the backend refuses"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_route_on_the_triton_kernels_gives_the_python_paths_bits(monkeypatch, training):
    pytest.importorskip("triton")
    from bnlab.backends.triton_backend import TritonBackend

    with torch.no_grad():
        bnlab.BatchNorm1d(2).eval()(torch.randn(3, 2))
    monkeypatch.setattr(backends, "_REGISTRY", [TritonBackend(allow_cpu=True, self_check=False), *backends._REGISTRY])
    torch.manual_seed(0)
    layers = [bnlab.BatchNorm2d(4).train(training) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.uniform_(0.5, 1.5)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    taken = []
    real = _fastpath.module_forward
    monkeypatch.setattr("bnlab.modules.module_forward", lambda *a: taken.append(1) or real(*a))
    y = layers[0](x)
    assert taken == []  # the route made the call
    with _fastpath.python_path_only():
        expected = layers[1](x)
    assert taken == [1]
    assert torch.equal(y, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), name
    if training:
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (ex,) = torch.autograd.grad(expected.square().sum(), x)
        assert torch.equal(gx, ex)
