"""The compiled whole-call eval (``bn_eval_module``, cpu_kernels_py_eval.inc).

A layer's inference call on the CPU goes through one compiled step that reads the tensors with the
C API and declines (returns None, changing nothing) anything but the plain case; the Python path
then runs. Checked here: the same bits, strides and dtype as the Python path and torch.nn's
float64 reference, that the entry is taken where it should be, that each decline condition declines and
the module still answers (or raises) as before, and, as a property, that its layout rules are
exactly ``cpu.layout_of``'s.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab
from bnlab import _fastpath
from bnlab.backends import cpu_build, cpu_eval_entry, cpu_train_entry
from bnlab.backends.cpu import PARALLEL_MIN_NUMEL, layout_of
from conftest import TOLERANCE, memory_layouts, randomize_state_, record_entry_answers, rel_err

ENTRY = cpu_eval_entry()
pytestmark = pytest.mark.skipif(ENTRY is None, reason="the CPU kernels' extension module did not build")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLASSES = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}


def _layer(rank: int, channels: int, affine: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_state_(CLASSES[rank](channels, affine=affine).eval())


def _float64_oracle(layer, x):
    """(x - running_mean) / sqrt(running_var + eps) * weight + bias, all in float64."""
    view = [1, -1] + [1] * (x.dim() - 2)
    mean, var = layer.running_mean.double().view(view), layer.running_var.double().view(view)
    y = (x.double() - mean) / torch.sqrt(var + layer.eps)
    if layer.weight is not None:
        y = y * layer.weight.detach().double().view(view) + layer.bias.detach().double().view(view)
    return y


def _python_path(layer, x):
    """The layer's output with the compiled entry switched off (the path every release before took)."""
    with _fastpath.python_path_only():
        return layer(x)


def _call(x, rm, rv, w, b, eps=1e-5, channels=None, ranks=(), grad=False, **layer):
    """The entry called directly on a stand-in layer with these tensors and attributes."""
    state = dict(training=False, virtual_batch_size=None, renorm=False, accumulation_steps=1, eps=eps,
                 num_features=x.shape[1] if channels is None else channels, _ranks=ranks,
                 _parameters={"weight": w, "bias": b}, _buffers={"running_mean": rm, "running_var": rv})  # fmt: skip
    state.update(layer)
    with torch.set_grad_enabled(grad):
        return ENTRY(SimpleNamespace(**{k: v for k, v in state.items() if v is not _ABSENT}), x)


_ABSENT = object()  # a layer attribute left out


@pytest.fixture
def taken(monkeypatch):
    """A list that records each answer of the entry during the test (None: declined)."""
    return record_entry_answers(monkeypatch, "cpu_eval_entry")



CASES = [(shape, dtype, affine) for shape in [(16, 7), (5, 6, 9), (2, 3, 4, 5), (3, 4, 2, 3, 5)]
         for dtype in DTYPES for affine in (True, False)]  # fmt: skip


@pytest.mark.parametrize("shape,dtype,affine", CASES)
def test_same_bits_as_the_python_path_and_the_float64_reference(shape, dtype, affine, taken):
    layer = _layer(len(shape), shape[1], affine)
    for name, arrange in memory_layouts(len(shape)):
        x = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        with torch.no_grad():
            y = layer(x)
            expected = _python_path(layer, x)
            oracle = _float64_oracle(layer, x)
        assert taken[-1] is y, name
        assert torch.equal(y, expected), name
        assert y.dtype == x.dtype and y.stride() == x.stride(), name
        assert rel_err(y, oracle) <= TOLERANCE[dtype], name


def test_pooled_outputs_and_the_allocator_give_the_same_bits(taken):
    layer = _layer(4, 16)
    x = torch.randn(16, 16, 32, 32)  # 1 MiB: from the pool
    with torch.no_grad():
        pooled = layer(x)
        bnlab.set_cpu_cache_limit(0)
        try:
            unpooled = layer(x)
        finally:
            bnlab.set_cpu_cache_limit(1 << 30)
    assert taken[0] is pooled and taken[1] is unpooled
    assert torch.equal(pooled, unpooled) and torch.equal(pooled, _python_path(layer, x))


def test_large_inputs_run_on_the_threads_and_agree(taken):
    layer = _layer(4, 8)
    x = torch.randn(8, 8, 32, 32)  # beyond PARALLEL_MIN_NUMEL
    assert x.numel() >= PARALLEL_MIN_NUMEL
    with torch.no_grad():
        y = layer(x)
    assert taken[-1] is y and torch.equal(y, _python_path(layer, x))


def test_a_graph_is_made_here_when_wanted(taken):
    layer = _layer(2, 5)
    x = torch.randn(4, 5)
    y = layer(x)  # grad enabled and the affine parameters require grad: the eval-mode node
    assert taken[-1] is y and type(y.grad_fn).__name__ == "CpuEvalFromKernelBackward"
    with torch.no_grad():
        plain = layer(x)
    assert plain.grad_fn is None and taken[-1] is plain and torch.equal(y, plain)
    layer.requires_grad_(False)
    assert layer(x).grad_fn is None and taken[-1] is not None  # nothing requires grad: no graph
    x.requires_grad_(True)
    y = layer(x)
    assert y.grad_fn is not None and taken[-1] is y
    with _fastpath.python_path_only():
        y_python = layer(x)
    (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    (dx_python,) = torch.autograd.grad(y_python, [x], torch.ones_like(y))
    assert torch.equal(y, y_python) and torch.equal(dx, dx_python)


@pytest.mark.parametrize("wanted", ["input", "weight", "bias"])
def test_a_graph_for_any_one_differentiable_tensor(wanted):
    c = 4
    x, rm, rv, w, b = torch.randn(3, c, 5), torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)
    tensors = {"input": x, "weight": w, "bias": b}
    tensors[wanted] = tensors[wanted].clone().requires_grad_()
    y = _call(tensors["input"], rm, rv, tensors["weight"], tensors["bias"], grad=True)
    assert y is not None and y.grad_fn is not None
    (grad,) = torch.autograd.grad(y, [tensors[wanted]], torch.ones_like(y))
    expected = {"input": torch.full_like(x, 1 / math.sqrt(1 + 1e-5)), "weight": x.sum((0, 2)) / math.sqrt(1 + 1e-5),
                "bias": torch.full((c,), 15.0)}[wanted]  # fmt: skip
    assert rel_err(grad, expected) <= TOLERANCE[torch.float32]


def test_a_negative_running_variance_still_raises_naming_the_channel(taken):
    layer = _layer(2, 4)
    layer.running_var[2] = -1.0
    with torch.no_grad(), pytest.raises(ValueError, match="running_var"):
        layer(torch.randn(3, 4))
    assert taken == [None]


def test_training_and_options_stay_on_the_python_path(taken):
    layer = _layer(2, 4)
    layer.train()
    layer(torch.randn(3, 4))
    assert taken == []  # training never asks
    ghost = bnlab.BatchNorm1d(4, virtual_batch_size=2).eval()
    with torch.no_grad():
        ghost(torch.randn(4, 4))
    assert taken == [None]  # a feature option: declined


def test_python_path_only_is_scoped(taken):
    layer, x = _layer(2, 3), torch.randn(4, 3)
    with torch.no_grad():
        with _fastpath.python_path_only():
            inside = layer(x)
        outside = layer(x)
    assert taken == [outside] and torch.equal(inside, outside)


def test_a_pinned_backend_other_than_cpu_turns_the_compiled_calls_off():
    """Both whole-call entries, eval and training (tests/test_backend_cpu_train_entry.py)."""
    train = cpu_train_entry()
    try:
        bnlab.set_backend("portable")
        assert cpu_eval_entry() is None and cpu_train_entry() is None
        bnlab.set_backend("cpu")
        assert cpu_eval_entry() is ENTRY and cpu_train_entry() is train
    finally:
        bnlab.set_backend(None)
    assert cpu_eval_entry() is ENTRY and cpu_train_entry() is train is not None


class _Sub(torch.Tensor):
    pass


def _declines():
    """(name, arguments for _call) each of which the entry must decline."""
    c = 4
    x = torch.randn(3, c, 5)
    rm, rv, w, b = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)
    yield "not a tensor", ([[1.0] * c] * 3, rm, rv, w, b), {"channels": c}
    yield "a tensor subclass", (x.as_subclass(_Sub), rm, rv, w, b), {}
    yield "integer input", (x.long(), rm, rv, w, b), {}
    yield "complex input", (torch.randn(3, c, 5, dtype=torch.complex64), rm, rv, w, b), {}
    yield "empty batch", (torch.randn(0, c, 5), rm, rv, w, b), {}
    yield "strided input", (torch.randn(3, c, 10)[:, :, ::2], rm, rv, w, b), {}
    yield "other channel count", (x, rm, rv, w, b), {"channels": c + 1}
    yield "rank not taken", (x, rm, rv, w, b), {"ranks": (2, 4)}
    yield "rank 1", (torch.randn(c), rm, rv, w, b), {"channels": c}
    yield "rank beyond eight", (torch.randn(1, c, *[1] * 7), rm, rv, w, b), {}
    yield "no running mean", (x, None, rv, w, b), {}
    yield "no running variance", (x, rm, None, w, b), {}
    yield "vector too long", (x, torch.zeros(c + 1), rv, w, b), {}
    yield "vector of rank 2", (x, rm, rv, torch.ones(1, c), b), {}
    yield "integer vector", (x, rm, rv, w, torch.zeros(c, dtype=torch.int32)), {}
    yield "strided vector", (x, torch.zeros(2 * c)[::2], rv, w, b), {}
    yield "vector not a tensor", (x, rm, rv, [1.0] * c, b), {}
    yield "integer eps", (x, rm, rv, w, b), {"eps": 1}
    yield "zero eps", (x, rm, rv, w, b), {"eps": 0.0}
    yield "negative eps", (x, rm, rv, w, b), {"eps": -1e-5}
    yield "infinite eps", (x, rm, rv, w, b), {"eps": math.inf}
    yield "NaN eps", (x, rm, rv, w, b), {"eps": math.nan}
    yield "negative running variance", (x, rm, -rv, w, b), {}
    yield "training", (x, rm, rv, w, b), {"training": True}
    yield "training not a bool", (x, rm, rv, w, b), {"training": 0}
    yield "no training attribute", (x, rm, rv, w, b), {"training": _ABSENT}
    yield "ghost batches", (x, rm, rv, w, b), {"virtual_batch_size": 2}
    yield "batch renormalization", (x, rm, rv, w, b), {"renorm": True}
    yield "accumulated statistics", (x, rm, rv, w, b), {"accumulation_steps": 2}
    yield "no eps", (x, rm, rv, w, b), {"eps": _ABSENT}
    yield "num_features not an int", (x, rm, rv, w, b), {"num_features": 4.0}
    yield "ranks not a tuple", (x, rm, rv, w, b), {"_ranks": [3]}
    yield "parameters not a dict", (x, rm, rv, w, b), {"_parameters": [w, b]}
    yield "no buffers", (x, rm, rv, w, b), {"_buffers": _ABSENT}
    if torch.backends.mps.is_available() or torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "mps"
        yield "input off the CPU", (x.to(device), rm, rv, w, b), {}
    yield "vector on the meta device", (x, rm, rv, torch.ones(c, device="meta"), b), {}


@pytest.mark.parametrize("name,args,kwargs", list(_declines()), ids=[d[0] for d in _declines()])
def test_each_unusual_call_is_declined(name, args, kwargs):
    assert _call(*args, **kwargs) is None


def _counting_mode(base: type, hook: str) -> type:
    """A subclass of the mode class `base` whose handler `hook` counts what runs under it (in
    .count: torch functions, tensor methods and attributes for a function mode, ATen operators for
    a dispatch mode), then runs it."""

    def handler(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))

    return type(f"Counting{base.__name__}", (base,), {"count": 0, hook: handler})


MODES = [_counting_mode(TorchFunctionMode, "__torch_function__"), _counting_mode(TorchDispatchMode, "__torch_dispatch__")]


@pytest.mark.parametrize("mode_class", MODES, ids=lambda m: m.__name__)
def test_a_torch_function_or_dispatch_mode_sees_the_call_and_gets_the_same_bits(mode_class, taken):
    # The torch build reads tensors beneath torch's Python layer, where a mode would see nothing,
    # so under a mode it declines and the Python path, whose torch operations the mode sees, runs.
    layer = _layer(4, 3)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        expected = _python_path(layer, x)
        mode = mode_class()
        with mode:
            y = layer(x)
    assert torch.equal(y, expected) and mode.count > 0
    # Both builds decline under a dispatch mode (make_fx records what runs under its mode); the
    # plain build's reads of the tensors are what a function mode sees of it.
    if cpu_build._state["variant"][0] == "torch" or issubclass(mode_class, TorchDispatchMode):
        assert taken == [None]


def test_a_default_device_set_leaves_the_call_compiled(taken):
    # torch.set_default_device's mode only fills in the device of factory functions called from
    # Python; the torch build makes its outputs on the CPU itself, so it does not decline there.
    layer = _layer(4, 3)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        expected = _python_path(layer, x)
        torch.set_default_device("cpu")
        try:
            y = layer(x)
        finally:
            torch.set_default_device(None)
    assert torch.equal(y, expected) and taken[-1] is y


def test_a_declined_call_leaves_no_error_behind():
    assert _call(torch.randn(3, 4).long(), torch.zeros(4), torch.ones(4), None, None) is None
    assert _call(torch.randn(3, 4), torch.zeros(4), torch.ones(4), None, None) is not None  # no stale error


def test_the_plain_call_with_an_optional_affine_missing_is_taken():
    x = torch.randn(6, 4)
    for w, b in ((None, torch.zeros(4)), (torch.ones(4), None), (None, None)):
        y = _call(x, torch.zeros(4), torch.ones(4), w, b)
        expected = torch.nn.functional.batch_norm(x, torch.zeros(4), torch.ones(4), w, b, False, 0.0, 1e-5)
        assert y is not None and rel_err(y, expected) <= TOLERANCE[torch.float32]


def test_a_wrong_argument_count_is_a_type_error():
    with pytest.raises(TypeError, match="expected 2 arguments, got 1"):
        ENTRY(torch.randn(2, 3))


def test_the_entry_reads_the_layer_as_it_is_now(taken):
    layer = _layer(4, 3)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = layer(x)
        layer.running_mean.add_(1.0)  # in place
        layer.running_var = torch.full((3,), 4.0)  # a new buffer
        layer.weight = torch.nn.Parameter(torch.full((3,), 2.0))
        layer.eps = 0.5
        after = layer(x)
    assert taken[0] is before and taken[1] is after
    assert torch.equal(after, _python_path(layer, x)) and not torch.equal(before, after)
    assert rel_err(after, _float64_oracle(layer, x)) <= TOLERANCE[torch.float32]


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    data=st.data(),
)
def test_takes_exactly_the_layouts_that_layout_of_takes(sizes, data):
    """Any permutation and slicing of a small tensor: the entry runs iff cpu.layout_of finds a
    layout, and then gives the Python path's bits."""
    base = torch.randn(*[s * 2 for s in sizes])
    steps = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(sizes), max_size=len(sizes)))
    x = base[tuple(slice(0, s * st_, st_) for s, st_ in zip(sizes, steps))]
    x = x.permute(*data.draw(st.permutations(range(len(sizes)))))
    layer = _layer(x.dim(), x.shape[1])
    y = _call(x, layer.running_mean, layer.running_var, layer.weight.detach(), layer.bias.detach())
    assert (y is None) == (layout_of(x) is None)
    if y is not None:
        assert y.stride() == x.stride()
        with torch.no_grad():
            assert torch.equal(y, _python_path(layer, x))


@pytest.mark.parametrize("transform", ["vmap", "grad"])  # (jvp: the forward-AD level check declines it first)
def test_under_a_torch_func_transform_even_a_plain_tensor_is_declined(transform):
    # A transform's own inputs are wrappers the entry refuses anyway; a tensor captured from outside
    # is plain, and only the check of the transform's level (functorch's dispatch keys, read in C++
    # by the torch build) sends the call to the Python path, whose torch ops the transform sees.
    c = 4
    x, rm, rv, w, b = torch.randn(3, c, 5), torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)
    answers = []

    def f(t):
        answers.append(_call(x, rm, rv, w, b))
        return (t * 2).sum()

    if transform == "vmap":
        torch.func.vmap(lambda u: f(u) * u)(torch.randn(2, 3))
    else:
        torch.func.grad(f)(torch.randn(3))
    assert answers == [None]
    assert _call(x, rm, rv, w, b) is not None  # outside any transform: taken
