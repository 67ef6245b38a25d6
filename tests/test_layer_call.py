"""The compiled layer call: ``layer(x)`` in one step, and nn.Module.__call__ whenever it would differ.

bnlab's BatchNorm1d/2d/3d define ``__call__``: with one positional argument it first asks
``_fastpath.LAYER_CALL`` (bn_layer_call, backends/cpu_kernels_py_call.inc), which runs the
compiled eval or training call directly, skipping nn.Module.__call__, forward and module_forward.
It must decline (None), changing nothing, whenever nn.Module.__call__ would do more than hand the
input to the plain forward: hooks (the layer's and global ones), a module.compile()'d call, an
overridden or instance-level forward, a patched nn.Module.__call__, torch.jit.trace. Where
nn.Module.__call__ would only call forward but no compiled call takes the input (another backend
chosen, the compiled calls switched off, a feature option, a CUDA tensor), it answers
NotImplemented and the layer calls forward itself. These tests record its answers and compare the
results with the Python path's bits and torch.nn.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnlab
from bnlab import _fastpath
from bnlab.backends import cpu_eval_entry
from speed_helpers import seeded_layer

pytestmark = pytest.mark.skipif(cpu_eval_entry() is None, reason="the CPU kernels' extension module did not build")


@pytest.fixture
def answers(monkeypatch):
    """The layer call's answers during the test, in order (None: declined; NotImplemented: forward)."""
    layer = bnlab.BatchNorm1d(2).eval()
    with torch.no_grad():
        layer(torch.randn(3, 2))  # the slot's stand-in sets the compiled call up
    real = _fastpath.LAYER_CALL["call"]
    assert real is not None and type(real).__name__ == "builtin_function_or_method"
    recorded = []

    def recording(layer, x):
        recorded.append(real(layer, x))
        return recorded[-1]

    monkeypatch.setitem(_fastpath.LAYER_CALL, "call", recording)
    return recorded


def _layer(cls=bnlab.BatchNorm2d, channels=3, training=False):
    return seeded_layer(cls, channels, training)


def _python_path(layer, x):
    """The same call with the compiled calls switched off, on a copy of the layer's state."""
    twin = type(layer)(layer.num_features)
    twin.load_state_dict(layer.state_dict())
    twin.train(layer.training)
    with _fastpath.python_path_only():
        return twin(x), twin


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cls,shape", [(bnlab.BatchNorm1d, (16, 3)), (bnlab.BatchNorm2d, (4, 3, 5, 6)),
                                       (bnlab.BatchNorm3d, (2, 3, 2, 3, 4))])  # fmt: skip
def test_the_plain_call_is_taken_with_the_python_paths_bits(answers, cls, shape, training, grad):
    layer = _layer(cls, training=training)
    x = torch.randn(shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        expected, twin = _python_path(layer, x)
        assert answers == [NotImplemented]  # the switch is off there: forward, called directly
        y = layer(x)
    assert len(answers) == 2 and answers[1] is y
    assert torch.equal(y, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, name), getattr(twin, name)), name
    if grad:
        dy = torch.randn(shape)
        got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        want = torch.autograd.grad(expected, (x, twin.weight, twin.bias), dy)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_training_call_counts_the_batch_once(answers):
    layer = _layer(training=True)
    layer(torch.randn(4, 3, 2, 2))
    assert answers[-1] is not None and layer.num_batches_tracked.item() == 1


def _hooked(kind, seen):
    layer = _layer()
    if kind == "forward_hook":
        layer.register_forward_hook(lambda m, args, out: seen.append("hook") or out * 2)
    elif kind == "forward_pre_hook":
        layer.register_forward_pre_hook(lambda m, args: seen.append("hook") or (args[0] * 2,))
    elif kind == "full_backward_hook":
        layer.register_full_backward_hook(lambda m, gi, go: seen.append("hook"))
    elif kind == "backward_pre_hook":
        layer.register_full_backward_pre_hook(lambda m, go: seen.append("hook"))
    return layer


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook", "full_backward_hook", "backward_pre_hook"])
def test_a_layer_with_hooks_is_declined_and_its_hooks_run(answers, kind):
    seen = []
    layer = _hooked(kind, seen)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert answers == [None] and seen == ["hook"]


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward", "backward_pre"])
def test_a_global_hook_is_declined_and_runs(answers, kind):
    register = {
        "forward": nn.modules.module.register_module_forward_hook,
        "forward_pre": nn.modules.module.register_module_forward_pre_hook,
        "backward": nn.modules.module.register_module_full_backward_hook,
        "backward_pre": nn.modules.module.register_module_full_backward_pre_hook,
    }[kind]
    seen = []
    handle = register(lambda *args: seen.append(kind) and None)
    try:
        layer = _layer()
        layer(torch.randn(4, 3, 2, 2, requires_grad=True)).sum().backward()
    finally:
        handle.remove()
    assert answers == [None] and seen == [kind]
    with torch.no_grad():
        layer(torch.randn(4, 3, 2, 2))
    assert answers[-1] is not None  # taken again once the hook is gone


def test_an_overridden_or_instance_forward_is_used(answers):
    class Doubling(bnlab.BatchNorm2d):
        def forward(self, input, mask=None):
            return 2 * super().forward(input, mask)

    x = torch.randn(4, 3, 2, 2)
    layer, plain = Doubling(3).eval(), bnlab.BatchNorm2d(3).eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2 * plain(x))
        plain.forward = lambda input: torch.zeros(1)
        assert torch.equal(plain(x), torch.zeros(1))
    assert answers == [None, answers[1], None] and answers[1] is not None


@pytest.mark.parametrize("base", [bnlab.BatchNorm2d, bnlab.BatchNormAct2d, bnlab.SyncBatchNorm,
                                  bnlab.SyncBatchNormAct2d])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_subclass_input_check_runs_on_every_input_as_in_torch_nn(answers, base, training):
    """torch.nn's forward calls _check_input_dim, the place for a subclass's own condition on the
    input; the fast paths tested only the rank, so such a check ran on no input they took."""
    seen = []

    class AtLeastTwoSamples(base):
        def _check_input_dim(self, input):
            seen.append(tuple(input.shape))
            if input.shape[0] < 2:
                raise ValueError("custom: batch too small")
            super()._check_input_dim(input)

    layer = AtLeastTwoSamples(3).train(training)
    with pytest.raises(ValueError, match="custom: batch too small"):
        layer(torch.randn(1, 3, 2, 2))
    y = layer(torch.randn(4, 3, 2, 2))
    # once per call, as torch.nn.BatchNorm2d and torch.nn.SyncBatchNorm, also where the layer's own
    # forward checks first and then hands on to BN's (which had checked a second time)
    assert seen == [(1, 3, 2, 2), (4, 3, 2, 2)]
    assert y.shape == (4, 3, 2, 2) and all(answer is None for answer in answers)
    # bnlab's own classes keep the fast paths: their _check_input_dim is the rank test they make
    assert not any(cls._own_input_check for cls in (bnlab.BatchNorm1d, bnlab.BatchNorm2d, bnlab.BatchNorm3d,
                                                     bnlab.BatchNormAct2d, bnlab.SyncBatchNorm, bnlab.LazyBatchNorm2d))


@pytest.mark.parametrize("act", [bnlab.BatchNormAct2d, bnlab.SyncBatchNormAct2d])
def test_a_forward_further_along_the_class_order_is_still_called(act):
    """A user's class overriding forward that comes after the BN + activation layer in a class's
    MRO: the layer hands on to it, as super().forward did (and its own check still runs once)."""
    log = []
    base = bnlab.BatchNorm2d if act is bnlab.BatchNormAct2d else bnlab.SyncBatchNorm

    class Logged(base):
        def forward(self, x, *args):
            log.append("Logged.forward")
            return super().forward(x, *args)

    class Act(act, Logged):
        pass

    class ActOwnCheck(act):
        def _check_input_dim(self, input):
            log.append("check")
            super()._check_input_dim(input)

    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(Act(3)(x), torch.relu(bnlab.BatchNorm2d(3)(x)))
    assert log == ["Logged.forward"]
    log.clear()
    torch.testing.assert_close(ActOwnCheck(3)(x), torch.relu(bnlab.BatchNorm2d(3)(x)))
    assert log == ["check"]


def test_other_bnlab_layers_keep_their_forward(answers):
    x = torch.randn(8, 3, 2, 2)
    act = bnlab.BatchNormAct2d(3).eval()
    with torch.no_grad():
        act.running_mean.fill_(5.0)  # every output below zero before the ReLU
        assert torch.equal(act(x), torch.zeros_like(x))
        sync = bnlab.SyncBatchNorm(3).eval()
        torch.testing.assert_close(sync(x), bnlab.BatchNorm2d(3).eval()(x))
    assert answers[0] is None and answers[1] is None


def test_a_compiled_call_or_patched_module_call_is_used(answers):
    layer, x = _layer(), torch.randn(4, 3, 2, 2)
    layer._compiled_call_impl = lambda *args: "compiled"  # what module.compile() sets
    with torch.no_grad():
        assert layer(x) == "compiled"
    del layer._compiled_call_impl
    original = nn.Module.__call__
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(nn.Module, "__call__", lambda self, *a, **k: ("patched", original(self, *a, **k))[0])
        assert layer(x) == "patched"
    with torch.no_grad():
        assert torch.is_tensor(layer(x))  # taken again once the patch is gone
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(nn.Module, "_call_impl", lambda self, *a, **k: "patched _call_impl")
        assert layer(x) == "patched _call_impl"
    assert answers[:2] == [None, None] and torch.is_tensor(answers[2]) and answers[3:] == [None]


# A patch of nn.Module._call_impl made before bnlab is imported, or after but before its first
# layer call, which sets the compiled call up: the layers must go through the patch.
PATCHED_BEFORE = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    def patched(self, *args, **kwargs):
        return "patched"

    if sys.argv[1] == "before import":
        nn.Module._call_impl = patched
    import bnlab
    if sys.argv[1] == "before the first call":
        nn.Module._call_impl = patched
    with torch.no_grad():
        print(bnlab.BatchNorm1d(3).eval()(torch.randn(4, 3)), nn.BatchNorm1d(3).eval()(torch.randn(4, 3)))
    """
)


@pytest.mark.parametrize("when", ["before import", "before the first call"])
def test_a_module_call_patched_before_the_first_call_is_used(when):
    out = subprocess.run([sys.executable, "-c", PATCHED_BEFORE, when], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["patched", "patched"]


def test_backends_and_the_switch_are_read_on_every_call(answers):
    layer, x = _layer(), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        try:
            bnlab.set_backend("portable")
            layer(x)
            bnlab.set_backend("cpu")
            layer(x)
        finally:
            bnlab.set_backend(None)
        with _fastpath.python_path_only():
            layer(x)
        layer(x)
    assert [a is NotImplemented for a in answers] == [True, False, True, False]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_plain_call_the_compiled_call_declines_runs_forward(answers, training):
    """A feature option (Ghost BN), which the compiled calls leave to the Python path: forward is
    called directly, with the Python path's results."""
    layer = bnlab.BatchNorm2d(3, virtual_batch_size=2).train(training)
    twin = bnlab.BatchNorm2d(3, virtual_batch_size=2).train(training)
    x = torch.randn(4, 3, 2, 2)
    y = layer(x)
    assert answers == [NotImplemented]
    with _fastpath.python_path_only():
        expected = twin(x)
    assert torch.equal(y, expected)
    assert torch.equal(layer.running_mean, twin.running_mean)


def test_other_arguments_go_through_module_call(answers):
    layer, x = _layer(training=True), torch.randn(4, 3, 2, 2)
    mask = torch.ones(4, 2, 2, dtype=torch.bool)
    y_mask, y_kw = layer(x, mask), layer(input=x)
    assert answers == []
    expected, _ = _python_path(_layer(training=True), x)
    assert answers == [NotImplemented]  # the switch is off there
    torch.testing.assert_close(y_mask, expected)
    torch.testing.assert_close(y_kw, expected)


@pytest.mark.parametrize("root", ["layer", "function"])
def test_jit_trace_records_the_layer(answers, root):
    """Traced as the root module or inside a traced function (where nothing else declines; its
    parameters frozen, as the tracer stores them as constants)."""
    layer, x = _layer().requires_grad_(root == "layer"), torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        traced = torch.jit.trace(layer if root == "layer" else (lambda x: layer(x)), x, check_trace=False)
        torch.testing.assert_close(traced(x + 1), layer(x + 1))
    assert answers[0] is None  # the call that traced
