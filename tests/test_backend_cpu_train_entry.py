"""The compiled whole training call (``bn_train_module``, cpu_kernels_py_train.inc).

A layer's training-mode call on the CPU goes through one compiled step that reads the tensors with
the C API, runs the forward kernel, and hands its results to a small autograd Function when a graph
is wanted; it declines (returns None, changing nothing) anything but the plain case, and the Python
path runs. Checked here: the same bits as the Python path (output, running statistics, batch count,
gradients, double backward) and closeness to torch.nn, that the entry is taken where it should be,
that each decline condition declines and leaves the layer's state as it was, and that the module
still answers (or raises) as before.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import _fastpath
from bnlab.backends import cpu_train_entry
from bnlab.backends.cpu import PARALLEL_MIN_NUMEL, layout_of
from conftest import TOLERANCE, memory_layouts, randomize_state_, record_entry_answers, rel_err

ENTRY = cpu_train_entry()
pytestmark = pytest.mark.skipif(ENTRY is None, reason="the CPU kernels' extension module did not build")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLASSES = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}
TORCH_CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def _layer(rank: int, channels: int, seed: int = 0, **options):
    torch.manual_seed(seed)
    return randomize_state_(CLASSES[rank](channels, **options))


def _state(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def taken(monkeypatch):
    """A list that records each answer of the entry during the test (None: declined)."""
    return record_entry_answers(monkeypatch, "cpu_train_entry")



def _step(layer, x, dy, python_path: bool):
    """(y, (dx, dweight, dbias), state after) of one training call and its backward."""
    xg = x.detach().clone().requires_grad_()
    wanted = [xg] + [p for p in (layer.weight, layer.bias) if p is not None]
    with _fastpath.python_path_only() if python_path else contextlib.nullcontext():
        y = layer(xg)
        grads = torch.autograd.grad(y, wanted, dy)
    return y.detach(), grads, _state(layer)


def _tolerance(dtype: torch.dtype, result: torch.Tensor) -> float:
    """The looser of the input's and the result's own precision (parameters stay float32)."""
    return max(TOLERANCE[dtype], TOLERANCE.get(result.dtype, 0.0))


OPTIONS = [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}, {"momentum": 0.3}]
CASES = [(shape, dtype) for shape in [(16, 7), (5, 6, 9), (2, 3, 4, 5), (3, 4, 2, 3, 5)] for dtype in DTYPES]


@pytest.mark.parametrize("shape,dtype", CASES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_same_bits_as_the_python_path_and_close_to_torch_nn(shape, dtype, options, taken):
    rank = len(shape)
    for name, arrange in memory_layouts(rank):
        fast, slow = _layer(rank, shape[1], **options), _layer(rank, shape[1], **options)
        reference = TORCH_CLASSES[rank](shape[1], **options).double()
        reference.load_state_dict(fast.state_dict())
        x = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        dy = arrange(torch.randn(shape, dtype=torch.float64).to(dtype))
        for _ in range(2):  # the second call meets updated running statistics and batch count
            y, grads, state = _step(fast, x, dy, python_path=False)
            assert isinstance(taken[-1], torch.Tensor), name
            y_py, grads_py, state_py = _step(slow, x, dy, python_path=True)
            assert torch.equal(y, y_py) and y.stride() == x.stride() and y.dtype == x.dtype, name
            assert all(torch.equal(a, b) for a, b in zip(grads, grads_py)), name
            assert _same_state(state, state_py), name
            xd = x.detach().double().requires_grad_()
            y_ref = reference(xd)
            assert rel_err(y, y_ref) <= TOLERANCE[dtype], name
            wanted = [xd] + [p for p in (reference.weight, reference.bias) if p is not None]
            for got, want in zip(grads, torch.autograd.grad(y_ref, wanted, dy.double())):
                assert rel_err(got, want) <= _tolerance(dtype, got) * 10, name
            for key, value in reference.state_dict().items():
                got = fast.state_dict()[key]
                assert rel_err(got.double(), value.double()) <= _tolerance(dtype, got), (name, key)


def test_large_pooled_inputs_run_on_the_threads_and_agree(taken):
    fast, slow = _layer(4, 16), _layer(4, 16)
    x = torch.randn(16, 16, 32, 32)  # 1 MiB: a pooled output, run on torch's threads
    assert x.numel() >= PARALLEL_MIN_NUMEL
    dy = torch.randn_like(x)
    y, grads, state = _step(fast, x, dy, python_path=False)
    y_py, grads_py, state_py = _step(slow, x, dy, python_path=True)
    assert isinstance(taken[-1], torch.Tensor)
    assert torch.equal(y, y_py) and all(torch.equal(a, b) for a, b in zip(grads, grads_py))
    assert _same_state(state, state_py)


@pytest.mark.parametrize("dy_form", ["channels_last", "expanded"])
def test_a_gradient_in_another_form_is_declined_by_the_backward_entry_and_still_right(dy_form, monkeypatch):
    """dy in another memory format, or with zero strides: bn_backward_module declines and the Python
    backward copies dy first; both give the bits of a plain dy. (Autograd casts a dy of another
    dtype to the output's before the backward runs.)"""
    x = torch.randn(4, 6, 3, 5)
    plain = torch.randn_like(x)
    other = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
             "expanded": lambda t: t[:1].expand_as(t)}[dy_form]  # fmt: skip
    if dy_form == "expanded":
        plain = plain[:1].expand_as(plain).contiguous()
    answers = []
    backend = bnlab.backends.get_backend("cpu")
    real = backend.backward_entry
    monkeypatch.setattr(backend, "backward_entry", lambda *a: answers.append(real(*a)) or answers[-1])
    _, grads_plain, _ = _step(_layer(4, 6), x, plain, python_path=False)
    _, grads_other, _ = _step(_layer(4, 6), x, other(plain), python_path=False)
    assert answers[0] is not None and answers[1] is None
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_other))


def test_without_a_graph_the_output_is_returned_as_it_is(taken):
    layer = _layer(2, 5)
    x = torch.randn(8, 5)
    with torch.no_grad():
        y = layer(x)
    assert taken[-1] is y and y.grad_fn is None and not y.requires_grad
    layer.requires_grad_(False)
    y = layer(x)  # grad mode on, nothing requires grad
    assert taken[-1] is y and y.grad_fn is None
    layer.weight.requires_grad_(True)
    y = layer(x)  # the weight alone: a graph
    assert taken[-1] is y and y.grad_fn is not None
    (dweight,) = torch.autograd.grad(y.sum() + (y * y).sum(), [layer.weight])
    assert torch.isfinite(dweight).all()
    assert int(layer.num_batches_tracked) == 3


def test_double_backward_goes_through_the_differentiable_closed_form(taken):
    fast, slow = _layer(2, 4), _layer(2, 4)
    x = torch.randn(6, 4, dtype=torch.float64)
    results = []
    for layer, python_path in ((fast, False), (slow, True)):
        xg = x.clone().requires_grad_()
        with _fastpath.python_path_only() if python_path else contextlib.nullcontext():
            y = layer(xg)
        (dx,) = torch.autograd.grad((y**3).sum(), [xg], create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), [xg, layer.weight]))
    assert isinstance(taken[0], torch.Tensor)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_a_default_device_does_not_move_the_statistics(device, taken):
    # The plain build made its (3, C) statistics with torch.empty, which torch.set_default_device
    # sends to that device ("a new output has no data" on meta); both builds make them on the CPU.
    layer, twin = bnlab.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    torch.set_default_device(device)
    try:
        y = layer(x)
        (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    finally:
        torch.set_default_device(None)
    y_nn = twin(x)
    (dx_nn,) = torch.autograd.grad(y_nn, [x], torch.ones_like(y_nn))
    assert taken[-1] is y and y.device.type == "cpu"
    assert rel_err(y, y_nn) <= TOLERANCE[torch.float32] and rel_err(dx, dx_nn) <= TOLERANCE[torch.float32]
    assert torch.allclose(layer.running_mean, twin.running_mean)


def test_one_value_per_channel_still_raises(taken):
    layer = _layer(2, 4)
    before = _state(layer)
    with pytest.raises(ValueError):
        layer(torch.randn(1, 4))
    assert taken == [None] and _same_state(before, _state(layer))


def test_eval_mode_and_options_stay_off_this_entry(taken):
    layer = _layer(2, 4).eval()
    with torch.no_grad():
        layer(torch.randn(3, 4))
    assert taken == []  # eval never asks
    ghost = bnlab.BatchNorm1d(4, virtual_batch_size=2)
    ghost(torch.randn(4, 4))
    assert taken == [None]  # a feature option: declined


def test_forward_mode_ad_and_torch_func_are_declined(taken):
    layer = _layer(2, 3)
    x, tangent = torch.randn(5, 3), torch.randn(5, 3)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, tangent))
        assert fwAD.unpack_dual(y).tangent is not None
    stateless = _layer(2, 3, track_running_stats=False)  # no buffer for a transform to mutate
    params = {k: v.detach() for k, v in stateless.named_parameters()}

    def loss(x):
        return (torch.func.functional_call(stateless, params, (x,)) ** 2).sum()

    dx = torch.func.grad(loss)(x)
    assert taken == [None, None] and torch.isfinite(dx).all()


def test_python_path_only_is_scoped(taken):
    layer, x = _layer(2, 3), torch.randn(4, 3)
    with _fastpath.python_path_only():
        layer(x)
    layer(x)
    assert len(taken) == 1 and isinstance(taken[0], torch.Tensor)


class _Sub(torch.Tensor):
    pass


def _stand_in(x, **attrs):
    """A stand-in layer in training mode with plain (C,) tensors and these attributes changed."""
    c = x.shape[1] if x.dim() >= 2 else 4
    state = dict(
        training=True, virtual_batch_size=None, renorm=False, accumulation_steps=1, eps=1e-5, num_features=c,
        _ranks=(), momentum=0.1, track_running_stats=True, skip_nonfinite=True,
        _parameters={"weight": torch.ones(c), "bias": torch.zeros(c)},
        _buffers={"running_mean": torch.zeros(c), "running_var": torch.ones(c),
                  "num_batches_tracked": torch.tensor(0)},
    )  # fmt: skip
    for key, value in attrs.items():
        if key in ("weight", "bias"):
            state["_parameters"][key] = value
        elif key in ("running_mean", "running_var", "num_batches_tracked"):
            state["_buffers"][key] = value
        else:
            state[key] = value
    return SimpleNamespace(**{k: v for k, v in state.items() if v is not _ABSENT})


_ABSENT = object()  # a layer attribute left out


def _declines():
    """(name, input, stand-in attributes) for each call the entry must decline."""
    c = 4
    x = torch.randn(3, c, 5)
    yield "not a tensor", [[1.0] * c] * 3, {}
    yield "a tensor subclass", x.as_subclass(_Sub), {}
    yield "integer input", x.long(), {}
    yield "empty batch", torch.randn(0, c, 5), {}
    yield "one value per channel", torch.randn(1, c), {}
    yield "strided input", torch.randn(3, c, 10)[:, :, ::2], {}
    yield "other channel count", x, {"num_features": c + 1}
    yield "rank not taken", x, {"_ranks": (2, 4)}
    yield "eval mode", x, {"training": False}
    yield "training not a bool", x, {"training": 1}
    yield "ghost batches", x, {"virtual_batch_size": 2}
    yield "batch renormalization", x, {"renorm": True}
    yield "accumulated statistics", x, {"accumulation_steps": 2}
    yield "integer eps", x, {"eps": 1}
    yield "NaN eps", x, {"eps": math.nan}
    yield "NaN momentum", x, {"momentum": math.nan}
    yield "infinite momentum", x, {"momentum": math.inf}
    yield "bool momentum", x, {"momentum": True}
    yield "tensor momentum", x, {"momentum": torch.tensor(0.1)}
    yield "huge int momentum", x, {"momentum": 10**400}
    yield "no momentum attribute", x, {"momentum": _ABSENT}
    yield "no track_running_stats attribute", x, {"track_running_stats": _ABSENT}
    yield "only a running mean", x, {"running_var": None}
    yield "only a running variance", x, {"running_mean": None}
    yield "strided running mean", x, {"running_mean": torch.zeros(2 * c)[::2]}
    yield "strided weight", x, {"weight": torch.ones(2 * c)[::2]}
    yield "integer weight", x, {"weight": torch.ones(c, dtype=torch.int32)}
    yield "weight too long", x, {"weight": torch.ones(c + 1)}
    yield "float counter", x, {"num_batches_tracked": torch.tensor(0.0)}
    yield "counter of two values", x, {"num_batches_tracked": torch.zeros(2, dtype=torch.long)}
    yield "counter not a tensor", x, {"num_batches_tracked": 0}
    yield "vector on the meta device", x, {"bias": torch.zeros(c, device="meta")}
    yield "parameters not a dict", x, {"_parameters": []}


@pytest.mark.parametrize("name,x,attrs", list(_declines()), ids=[d[0] for d in _declines()])
def test_each_unusual_call_is_declined_and_changes_nothing(name, x, attrs):
    layer = _stand_in(x if isinstance(x, torch.Tensor) else torch.randn(3, 4), **attrs)
    buffers = layer._buffers if isinstance(getattr(layer, "_buffers", None), dict) else {}
    before = {k: v.clone() for k, v in buffers.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    assert ENTRY(layer, x) is None
    assert before and all(torch.equal(v, buffers[k]) for k, v in before.items())


def test_the_plain_stand_in_is_taken_and_counts_the_batch():
    """The decline table's baseline: unchanged, the stand-in is taken (so each decline above is due
    to its one change), and a layer without the skip_nonfinite attribute gets the guard's default."""
    x = torch.randn(3, 4, 5)
    for attrs in ({}, {"skip_nonfinite": _ABSENT}, {"num_batches_tracked": None, "momentum": None}):
        layer = _stand_in(x, **attrs)
        with torch.no_grad():
            y = ENTRY(layer, x)
        expected = torch.nn.functional.batch_norm(x, None, None, torch.ones(4), torch.zeros(4), True, 0.1, 1e-5)
        assert y is not None and rel_err(y, expected) <= TOLERANCE[torch.float32]
    assert int(_stand_in(x)._buffers["num_batches_tracked"]) == 0
    layer = _stand_in(x)
    with torch.no_grad():
        ENTRY(layer, x)
    assert int(layer._buffers["num_batches_tracked"]) == 1
    assert rel_err(layer._buffers["running_mean"], 0.1 * x.mean((0, 2))) <= TOLERANCE[torch.float32]


def _versions(layer) -> list[int]:
    return [layer.running_mean._version, layer.running_var._version, layer.num_batches_tracked._version]


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_buffer_versions_move_as_torch_nns(path, momentum, taken):
    """The kernels count the batch in num_batches_tracked through its data pointer; its version
    counter must move as torch.nn's `add_(1)` moves it (the running averages' as torch.nn's kernel
    leaves theirs: unmoved), and not at all for a batch the non-finite guard skips (nothing
    counted). With and without a graph, on the compiled call and on the Python path."""
    x = torch.randn(8, 5, 3)
    ours, theirs = bnlab.BatchNorm1d(5, momentum=momentum), torch.nn.BatchNorm1d(5, momentum=momentum)
    with _fastpath.python_path_only() if path == "python" else contextlib.nullcontext():
        for grad in (True, False, True):
            with torch.set_grad_enabled(grad):
                ours(x.clone().requires_grad_(grad))
                theirs(x.clone().requires_grad_(grad))
            assert _versions(ours) == _versions(theirs)
        assert _versions(ours)[2] > 1 and int(ours.num_batches_tracked) == 3
        bad = x.clone()
        bad[0, 0, 0] = float("nan")
        with torch.no_grad():
            ours(bad)
        assert _versions(ours) == _versions(theirs) and int(ours.num_batches_tracked) == 3  # skipped
    # the compiled call took all four calls; python_path_only keeps the Python path off it
    assert len(taken) == (0 if path == "python" else 4) and None not in taken


def test_a_declined_call_leaves_no_error_behind():
    x = torch.randn(3, 4)
    assert ENTRY(_stand_in(x, momentum=10**400), x) is None
    with torch.no_grad():
        assert ENTRY(_stand_in(x), x) is not None  # no stale error


def test_a_wrong_argument_count_is_a_type_error():
    with pytest.raises(TypeError, match="expected 2 arguments, got 1"):
        ENTRY(torch.randn(2, 3))
    lib = bnlab.backends.get_backend("cpu").kernels()
    with pytest.raises(TypeError, match="expected 7 arguments, got 2"):
        lib.bn_backward_module(torch.randn(2, 3), torch.randn(2, 3))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5), data=st.data())
def test_takes_exactly_the_layouts_that_layout_of_takes(sizes, data):
    """Any permutation and slicing of a small tensor: the entry runs iff cpu.layout_of finds a layout
    (and there is more than one value per channel), and then gives the Python path's bits, running
    statistics included."""
    base = torch.randn(*[s * 2 for s in sizes])
    steps = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(sizes), max_size=len(sizes)))
    x = base[tuple(slice(0, s * st_, st_) for s, st_ in zip(sizes, steps))]
    x = x.permute(*data.draw(st.permutations(range(len(sizes)))))
    stand_in = _stand_in(x)  # weight 1, bias 0, running mean 0, variance 1: a new layer's state
    with torch.no_grad():
        y = ENTRY(stand_in, x)
    taken = layout_of(x) is not None and x.numel() > x.shape[1]
    assert (y is not None) == taken
    if taken:
        layer = CLASSES[x.dim()](x.shape[1])
        with torch.no_grad(), _fastpath.python_path_only():
            expected = layer(x)
        assert torch.equal(y, expected) and y.stride() == x.stride()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(stand_in._buffers[name], getattr(layer, name)), name


@pytest.mark.parametrize("grad", [False, True])
def test_buffers_made_under_inference_mode_are_declined_outside_it_and_refused_unchanged(grad, taken):
    """A layer built under torch.inference_mode() (its buffers inference tensors) and then trained
    outside it: torch.nn's num_batches_tracked.add_(1) raises, where the kernel had written the
    buffers through their pointers and counted the batch, silently (a reviewer's reproduction).
    Declined, and the Python path raises torch's error before any state moves; inside the mode the
    call is taken and agrees with torch.nn."""
    x = torch.randn(6, 4, 3)
    with torch.inference_mode():
        layer, twin = bnlab.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    before = _state(layer)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="^Inplace update to inference tensor"):
        layer(x)
    assert taken == [None] and _same_state(before, _state(layer))
    with pytest.raises(RuntimeError, match="^Inplace update to inference tensor"):
        twin(x)  # the oracle refuses too
    with torch.inference_mode():
        y, y_nn = layer(x), twin(x)
    assert isinstance(taken[-1], torch.Tensor) and int(layer.num_batches_tracked) == 1
    assert rel_err(y, y_nn) <= TOLERANCE[torch.float32]
    assert rel_err(layer.running_var, twin.running_var) <= TOLERANCE[torch.float32]
