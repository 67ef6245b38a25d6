"""triton_launch: the direct launch of compiled Triton kernels, without a GPU.

The key is checked against Triton's own specialization (native_specialize_impl with the CUDA
backend, what JITFunction.run computes per launch), the constexpr tail against Triton's own
argument binder on bnlab's real kernels, and the launch logic on a stand-in kernel whose compiled
launcher records what it is handed (the tests stand in for a GPU: _on_gpu, _current_device and
_stream are patched).
"""

from __future__ import annotations

import gc
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from bnlab.backends import triton_elementwise, triton_grad, triton_launch, triton_reduce, triton_small  # noqa: E402

_BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))
_BUFFER = torch.zeros(64, dtype=torch.float64)


def triton_spec(arg):
    """Triton's specialization of one non-constexpr argument (as its binder computes it)."""
    return native_specialize_impl(_BACKEND, arg, False, True, True)


_INT_EDGES = [0, 1, 2, 15, 16, 17, 32, -1, -16, -(1 << 31), (1 << 31) - 1, 1 << 31, (1 << 31) + 16, -(1 << 31) - 1,
              (1 << 63) - 1, 1 << 63, (1 << 63) + 16, (1 << 64) - 16]  # fmt: skip
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.int64]


@st.composite
def kernel_args(draw):
    kind = draw(st.sampled_from(["tensor", "int", "bool", "float", "none"]))
    if kind == "tensor":
        dtype = draw(st.sampled_from(_DTYPES))
        # views of one buffer at byte offsets 0..63: every alignment class
        return _aligned_view(dtype, draw(st.integers(0, 60)))
    if kind == "int":
        return draw(st.one_of(st.sampled_from(_INT_EDGES), st.integers(-(1 << 40), 1 << 40)))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "float":
        return draw(st.floats(allow_nan=False, width=64))
    return None


def _aligned_view(dtype: torch.dtype, offset: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    start = offset - offset % size  # a view must start on an element
    return _BUFFER.view(torch.uint8)[start : start + 4 * size].view(dtype)


@settings(max_examples=400, deadline=None)
@given(kernel_args(), kernel_args())
def test_two_arguments_share_a_key_exactly_when_triton_specializes_them_alike(a, b):
    assert (triton_launch.arg_key(a) == triton_launch.arg_key(b)) == (triton_spec(a) == triton_spec(b)), (a, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(kernel_args(), max_size=12), st.booleans())
def test_the_inline_key_of_a_launch_is_each_arguments_key(args, as_parameter):
    if as_parameter:  # a module's weight: a Parameter, not a plain tensor
        args = [torch.nn.Parameter(a, requires_grad=False) if isinstance(a, torch.Tensor) else a for a in args]
    assert triton_launch._key_of(tuple(args)) == [triton_launch.arg_key(a) for a in args]


@pytest.mark.parametrize("arg", _INT_EDGES + [True, False, 0.5, None])
def test_key_of_edge_values_matches_triton_within_their_kind(arg):
    # every other edge value of the same kind: same key <=> same specialization
    for other in _INT_EDGES + [True, False, 0.5, -2.0, None]:
        assert (triton_launch.arg_key(arg) == triton_launch.arg_key(other)) == (triton_spec(arg) == triton_spec(other))


# --- the compiled key (cpu_kernels_py_launch.inc) against the Python one -----------------------------

_KWARGS = st.dictionaries(st.sampled_from(["BLOCK", "RELU", "num_warps", "enable_fp_fusion", "NCL"]),
                          st.one_of(st.integers(-3, 300), st.booleans(), st.sampled_from([None, "x", 1.5])), max_size=4)  # fmt: skip


class _Subclass(torch.Tensor):
    """A tensor subclass: keyed as a tensor, as isinstance(arg, torch.Tensor) does."""


class _IntSubclass(int):
    pass


def _both_keys(kernel, device, kwargs, args):
    compiled = _compiled_key()
    if compiled is None:
        pytest.skip("bnlab's compiled module (bn_launch_key) is unavailable here")
    return compiled(kernel, device, kwargs, tuple(args)), triton_launch.python_launch_key(kernel, device, kwargs, tuple(args))


@settings(max_examples=300, deadline=None)
@given(st.lists(kernel_args(), max_size=8), st.lists(kernel_args(), max_size=8), _KWARGS, _KWARGS,
       st.integers(0, 1), st.integers(0, 1), st.booleans())  # fmt: skip
def test_the_compiled_key_tells_two_launches_apart_exactly_when_the_python_key_does(a, b, kw_a, kw_b, dev_a, dev_b,
                                                                                   same_kernel):  # fmt: skip
    kernel_a = triton_small.small_eval_kernel
    kernel_b = kernel_a if same_kernel else triton_small.small_forward_kernel
    if len(b) == len(a) and a and isinstance(a[0], torch.Tensor) and isinstance(b[0], torch.Tensor):
        b[0] = a[0]  # make equal keys likely too: the same first tensor
    compiled_a, python_a = _both_keys(kernel_a, dev_a, kw_a, a)
    compiled_b, python_b = _both_keys(kernel_b, dev_b, kw_b, b)
    assert (compiled_a == compiled_b) == (python_a == python_b)
    assert compiled_a == _both_keys(kernel_a, dev_a, dict(kw_a), list(a))[0]  # the same launch: the same key
    if python_a == python_b:
        assert hash(compiled_a) == hash(compiled_b)


@pytest.mark.parametrize("arg", _INT_EDGES + [True, False, 0.5, None, "text", (1, 2)])
def test_compiled_key_of_edge_values_matches_the_python_key(arg):
    for other in _INT_EDGES + [True, False, 0.5, -2.0, None, "text", (1, 2), _IntSubclass(16), _IntSubclass(1)]:
        compiled_a, python_a = _both_keys(triton_launch, 0, {}, [arg])
        compiled_b, python_b = _both_keys(triton_launch, 0, {}, [other])
        assert (compiled_a == compiled_b) == (python_a == python_b), (arg, other)


def test_compiled_key_takes_parameters_and_tensor_subclasses_as_tensors():
    x = _aligned_view(torch.float32, 0)
    forms = [x, torch.nn.Parameter(x, requires_grad=False), x.as_subclass(_Subclass)]
    keys = {_both_keys(triton_launch, 0, {}, [form, 3])[0] for form in forms}
    assert len(keys) == 1
    assert _both_keys(triton_launch, 0, {}, [_aligned_view(torch.float32, 4), 3])[0] not in keys


def test_compiled_key_keeps_the_reference_counts_of_what_it_reads_and_raises_what_python_raises():
    import sys

    compiled = _compiled_key()
    if compiled is None:
        pytest.skip("bnlab's compiled module (bn_launch_key) is unavailable here")
    class Broken(torch.Tensor):
        def data_ptr(self):
            raise RuntimeError("no storage")

    x, value, text, broken = torch.zeros(8), object(), "a-kwarg-value", torch.zeros(4).as_subclass(Broken)
    args, kwargs = (x, 1 << 40, value, 0.5), {"BLOCK": text}
    with pytest.raises(RuntimeError, match="no storage"):
        compiled(triton_launch, 0, kwargs, (x, value, broken, 3))
    watched = (x, value, text, broken)
    # x's dtype is shared with every float32 tensor: other objects' garbage collection moves its
    # count, where a leak would add 1000; earlier tests' garbage collected first, and none while counting
    gc.collect()
    gc.disable()
    try:
        dtype_before = sys.getrefcount(x.dtype)
        before = [sys.getrefcount(o) for o in watched]
        for _ in range(1000):
            compiled(triton_launch, 0, kwargs, args)
        after_calls = [sys.getrefcount(o) for o in watched]
        failures = 0
        for _ in range(1000):  # the error path: the key's items made so far released with it
            try:
                compiled(triton_launch, 0, kwargs, (x, value, broken, 3))
            except RuntimeError:
                failures += 1
        after_failures, dtype_after = [sys.getrefcount(o) for o in watched], sys.getrefcount(x.dtype)
    finally:
        gc.enable()
    assert after_calls == before
    assert failures == 1000 and after_failures == before
    assert abs(dtype_after - dtype_before) < 100
    with pytest.raises(TypeError, match="bn_launch_key: expected"):
        compiled(triton_launch, 0, [], args)
    with pytest.raises(TypeError, match="unhashable"):
        hash(compiled(triton_launch, 0, {"BLOCK": [64]}, args))


def test_launch_never_builds_the_module_and_waits_for_it_to_be_loaded(monkeypatch):
    from bnlab.backends import cpu_build

    def no_build():
        raise AssertionError("a launch must not start the CPU build")

    monkeypatch.setattr(triton_launch, "_launch_key", triton_launch._first_launch_key)
    monkeypatch.setattr(cpu_build, "load_tried", lambda: False)
    monkeypatch.setattr(cpu_build, "load", no_build)
    key = triton_launch._launch_key(triton_launch, 0, {}, (1,))
    assert key == triton_launch.python_launch_key(triton_launch, 0, {}, (1,))
    assert triton_launch._launch_key is triton_launch._first_launch_key  # asked again at the next launch


def test_launch_chooses_the_compiled_key_where_the_module_has_it(monkeypatch):
    compiled = _compiled_key()
    monkeypatch.setattr(triton_launch, "_launch_key", triton_launch._first_launch_key)
    key = triton_launch._launch_key(triton_launch, 0, {}, (1,))
    chosen = triton_launch._launch_key
    assert chosen is (compiled or triton_launch.python_launch_key)
    assert key == chosen(triton_launch, 0, {}, (1,))
    monkeypatch.setattr(triton_launch, "_launch_key", triton_launch._first_launch_key)
    monkeypatch.setattr(triton_launch, "_compiled_launch_key", lambda: None)  # no compiled module
    triton_launch._launch_key(triton_launch, 0, {}, (1,))
    assert triton_launch._launch_key is triton_launch.python_launch_key


# The tests run Triton's interpreter (TRITON_INTERPRET=1), whose kernels are InterpretedFunctions:
# each kernel's Python function is wrapped as the JITFunction a GPU process would launch.
_KERNELS = [triton_reduce.stats_ncl_kernel, triton_reduce.stats_nlc_kernel, triton_reduce.stats_merge_kernel,
            triton_grad.grad_ncl_kernel, triton_grad.grad_nlc_kernel, triton_grad.grad_merge_kernel,
            triton_elementwise.normalize_kernel, triton_elementwise.grad_input_kernel,
            triton_elementwise.grad_input_merged_kernel, triton_elementwise.eval_kernel,
            triton_elementwise.eval_coef_kernel, triton_small.small_forward_kernel,
            triton_small.small_backward_kernel, triton_small.small_eval_kernel]  # fmt: skip


@pytest.mark.parametrize("kernel", _KERNELS, ids=lambda k: k.fn.__name__)
def test_constexpr_tail_is_what_tritons_binder_hands_the_launcher_after_the_positional_arguments(kernel):
    kernel = JITFunction(kernel.fn)
    params = list(kernel.signature.parameters.values())
    positional = [i + 2 for i, p in enumerate(params) if i not in kernel.constexprs]
    n = len(positional)
    assert all(i not in kernel.constexprs for i in range(n)), "bnlab passes non-constexprs first, positionally"
    # every constexpr by keyword but the last one that has a default (left to its default)
    defaulted = [p.name for i, p in enumerate(params) if i in kernel.constexprs and p.default is not p.empty]
    kwargs = {p.name: 100 + i for i, p in enumerate(params) if i in kernel.constexprs and p.name not in defaulted[-1:]}
    kwargs.update(num_warps=4, enable_fp_fusion=True)
    binder = create_function_from_signature(kernel.signature, kernel.params, _BACKEND)
    bound, _, _ = binder(*positional, **kwargs)
    assert triton_launch._constexpr_tail(kernel, n, kwargs) == tuple(bound.values())[n:]


def test_constexpr_tail_refuses_a_positional_constexpr_and_a_missing_one():
    kernel = JITFunction(triton_elementwise.eval_coef_kernel.fn)
    params = list(kernel.signature.parameters)
    first_constexpr = min(kernel.constexprs)
    assert triton_launch._constexpr_tail(kernel, first_constexpr + 1, {}) is None  # its value would not be keyed
    no_default = [params[i] for i in kernel.constexprs if kernel.signature.parameters[params[i]].default is inspect._empty]
    assert no_default
    assert triton_launch._constexpr_tail(kernel, first_constexpr, {}) is None


# --- the launch logic, on a stand-in kernel -------------------------------------------------------


def _stand_in(x, n, scale, BLOCK: "constexpr", RELU: "constexpr" = False):  # noqa: F821  (a signature only)
    pass


class FakeCompiled:
    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self):
        self.runs = []

    def run(self, *launch_args):
        self.runs.append(launch_args)


class FakeKernel:
    """What launch uses of a JITFunction: kernel[grid](...) returning the compiled kernel, the
    signature and the constexprs' indices."""

    signature = inspect.signature(_stand_in)
    constexprs = [3, 4]

    def __init__(self):
        self.jit_calls = []
        self.compiled = []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]

        return call


def _compiled_key():
    """The extension module's bn_launch_key (set up), or None where bnlab's compiled module is unavailable."""
    return triton_launch._compiled_launch_key()


@pytest.fixture(params=["compiled key", "python key"])
def gpu(monkeypatch, request):
    """A stand-in GPU for launch(), with each of the two key functions."""
    key = _compiled_key() if request.param == "compiled key" else triton_launch.python_launch_key
    if key is None:
        pytest.skip("bnlab's compiled module (bn_launch_key) is unavailable here")
    monkeypatch.setattr(triton_launch, "_launch_key", key)
    monkeypatch.setattr(triton_launch, "_on_gpu", lambda t: True)
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_stream", lambda device: 1234 + device)
    monkeypatch.setattr(triton_launch, "ENABLED", True)
    triton_launch.clear()
    yield
    triton_launch.clear()


def test_second_launch_of_a_specialization_calls_the_compiled_launcher_with_tritons_arguments(gpu):
    kernel, x = FakeKernel(), torch.zeros(16)
    triton_launch.launch(kernel, (3, 2), x, 40, 0.5, BLOCK=64, num_warps=4)
    assert kernel.jit_calls == [((3, 2), (x, 40, 0.5), {"BLOCK": 64, "num_warps": 4})]
    y = torch.ones(16)
    triton_launch.launch(kernel, (5,), y, 48, 2.0, BLOCK=64, num_warps=4)  # 48 is a multiple of 16, 40 is not
    assert len(kernel.jit_calls) == 2 and kernel.compiled[0].runs == []
    triton_launch.launch(kernel, (5,), y, 32, 3.0, BLOCK=64, num_warps=4)  # 32 specializes as 48 does: direct
    assert len(kernel.jit_calls) == 2
    assert kernel.compiled[1].runs == [(5, 1, 1, 1234, "function-handle", "packed-metadata", None, None, None,
                                        y, 32, 3.0, 64, False)]  # fmt: skip  (RELU's default in the tail)


@pytest.mark.parametrize("change", ["misaligned", "one", "dtype", "constexpr", "option", "wide_int", "device"])
def test_a_launch_triton_would_specialize_differently_goes_through_triton(gpu, monkeypatch, change):
    kernel, x = FakeKernel(), torch.zeros(16)
    triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=64, num_warps=4)
    args, kwargs = [x, 40, 0.5], {"BLOCK": 64, "num_warps": 4}
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "one":
        args[1] = 1
    elif change == "dtype":
        args[0] = x.to(torch.bfloat16)
    elif change == "constexpr":
        kwargs["BLOCK"] = 128
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "wide_int":
        args[1] = (1 << 31) + 8
    else:
        monkeypatch.setattr(triton_launch, "_current_device", lambda: 1)
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    assert len(kernel.jit_calls) == 2 and kernel.compiled[0].runs == []


def test_hooks_disabling_and_cpu_tensors_always_take_tritons_path(gpu, monkeypatch):
    kernel, x = FakeKernel(), torch.zeros(16)

    def three_launches():
        for _ in range(3):
            triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=64)

    def hook(*args):
        pass

    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        three_launches()
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.jit_calls) == 3 and not any(c.runs for c in kernel.compiled)
    monkeypatch.setattr(triton_launch, "ENABLED", False)
    three_launches()
    assert len(kernel.jit_calls) == 6
    monkeypatch.setattr(triton_launch, "ENABLED", True)
    monkeypatch.setattr(triton_launch, "_on_gpu", lambda t: t.is_cuda)  # the real test: CPU tensors
    three_launches()
    assert len(kernel.jit_calls) == 9 and not any(c.runs for c in kernel.compiled)
    monkeypatch.setattr(triton_launch, "_on_gpu", lambda t: True)
    three_launches()  # no hook, enabled, "on the GPU": one launch through Triton, two direct
    assert len(kernel.jit_calls) == 10 and len(kernel.compiled[-1].runs) == 2


def test_a_positional_constexpr_or_an_unhashable_argument_is_never_remembered(gpu):
    kernel, x = FakeKernel(), torch.zeros(16)
    for _ in range(2):
        triton_launch.launch(kernel, (1,), x, 40, 0.5, 64)  # BLOCK positionally: its value is not in the key
    for _ in range(2):
        triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=[64])  # a list: cannot be a key
    assert len(kernel.jit_calls) == 4 and not any(c.runs for c in kernel.compiled)


def test_environment_variable_turns_direct_launches_off(tmp_path):
    import subprocess
    import sys

    code = "from bnlab.backends import triton_launch as t; print(t.ENABLED)"
    env = {"BNLAB_TRITON_DIRECT_LAUNCH": "0", "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env.pop("BNLAB_TRITON_DIRECT_LAUNCH")
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")
    assert "BNLAB_TRITON_DIRECT_LAUNCH" not in off.stderr + on.stderr
    env["BNLAB_TRITON_DIRECT_LAUNCH"] = "false"  # not a value it takes: named in a warning, launches stay on
    odd = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert odd.stdout.strip() == "True"
    assert "BNLAB_TRITON_DIRECT_LAUNCH: expected 0 (off) or 1 (on), got 'false'" in odd.stderr


def test_a_launcher_that_refuses_the_arguments_turns_direct_launches_off_with_a_warning(gpu):
    kernel, x = FakeKernel(), torch.zeros(16)
    triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=64)

    def refuse(*args):
        raise TypeError("launch() takes 12 positional arguments")

    kernel.compiled[0].run = refuse
    with pytest.warns(RuntimeWarning, match="direct Triton launches turned off.*takes 12 positional"):
        triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=64)
    assert len(kernel.jit_calls) == 2 and not triton_launch.ENABLED  # launched through Triton instead
    triton_launch.launch(kernel, (1,), x, 40, 0.5, BLOCK=64)
    assert len(kernel.jit_calls) == 3
