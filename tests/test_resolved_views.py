"""Tensors the CPU kernels must not read as they are, on every path of a layer's call.

Tensors with torch's negative bit (``torch._neg_view``): a view whose memory holds -t, which
torch's own operators resolve as they read it. bnlab's kernels read memory by pointer, so every
path must resolve such a tensor first (views.kernel_input, cpu_layout.fits, cpu_arguments.param
and _like; the compiled calls decline it: cpu_kernels_torch.cpp, and facts_of in the plain build).
Before the fortieth session a contiguous one was normalised without its sign (outputs 6-13 off
torch.nn). Also (C,) parameters and running statistics sliced with a step (cpu_arguments.param
copies them; the compiled calls and the running averages' in-place update decline them).

The oracle: the same layer state and calls on the plain tensors (bits), and torch.nn.
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab._fastpath import python_path_only
from speed_helpers import STEP_AND_EVAL, assert_close, make_input, step_and_eval, to_layout

SHAPES = {"(N, C)": ((64, 12), "nchw"), "NCHW": ((4, 6, 5, 5), "nchw"), "channels_last": ((4, 6, 5, 5), "cl")}
WHERE = ["input", "gradient", "parameters", "running statistics", "strided vectors"]


def _state(channels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g),
            torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5]  # fmt: skip


def _strided(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t, -t], 1).view(-1)[::2]  # t's values at stride 2


def _layer(cls, state, where: str | None = None):
    """A layer with weight, bias, running mean and variance ``state``; for where = "parameters" or
    "running statistics" each is a negative-bit view holding the same values, for "strided
    vectors" a view at stride 2."""
    layer = cls(state[0].shape[0])
    odd = {"parameters": lambda t: torch._neg_view(-t), "running statistics": lambda t: torch._neg_view(-t),
           "strided vectors": _strided}  # fmt: skip
    flip = odd.get(where, torch.clone)
    layer.weight = torch.nn.Parameter(flip(state[0]))
    layer.bias = torch.nn.Parameter(flip(state[1]))
    layer.running_mean, layer.running_var = flip(state[2]), flip(state[3])
    return layer


def _run(layer, x, dy, path):
    """speed_helpers.step_and_eval within ``path`` (the compiled calls, or the Python path)."""
    with path():
        return step_and_eval(layer, x, dy)


@pytest.mark.parametrize("path", ["compiled calls", "Python path"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_odd_tensors_give_the_bits_of_their_resolved_contiguous_values(shape_name, where, path):
    shape, layout = SHAPES[shape_name]
    cls = bnlab.BatchNorm1d if len(shape) == 2 else bnlab.BatchNorm2d
    x = to_layout(make_input(shape, seed=90), layout)
    dy = to_layout(make_input(shape, seed=91), layout)
    state = _state(shape[1], seed=92)
    run_in = python_path_only if path == "Python path" else torch.enable_grad
    if where == "input":
        x_neg, dy_neg = torch._neg_view(-x), dy
    elif where == "gradient":
        x_neg, dy_neg = x, torch._neg_view(-dy)
    else:
        x_neg, dy_neg = x, dy
    assert x_neg.is_neg() == (where == "input") and torch.equal(x_neg, x)
    odd_layer = _layer(cls, state, where)
    assert torch.equal(odd_layer.weight, state[0]) and torch.equal(odd_layer.running_var, state[3])
    got = _run(odd_layer, x_neg, dy_neg, run_in)
    want = _run(_layer(cls, state), x, dy, run_in)
    for a, b, what in zip(got, want, STEP_AND_EVAL):
        assert torch.equal(a, b), (shape_name, where, path, what)
    theirs = _layer(getattr(torch.nn, cls.__name__), state)
    for a, b, what in zip(got, _run(theirs, x, dy, torch.enable_grad), STEP_AND_EVAL):
        assert_close(a, b, 2e-4, f"{shape_name} {where} {path} {what} vs torch.nn")


def test_the_primitives_resolve_negative_bit_views():
    """SyncBatchNorm's primitives (moments, normalize, grad_sums, grad_input, backward) on a
    negative-bit input, gradient and statistics give the bits of the resolved tensors."""
    from bnlab.backends.cpu import CpuBackend

    cpu = CpuBackend()
    x, dy = make_input((5, 4, 3, 6), seed=93), make_input((5, 4, 3, 6), seed=94)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    neg = lambda t: torch._neg_view(-t)  # noqa: E731
    m, m_neg = cpu.moments(x), cpu.moments(neg(x))
    assert torch.equal(m.mean, m_neg.mean) and torch.equal(m.m2, m_neg.m2)
    invstd = torch.rsqrt(m.m2 / m.count + 1e-5)
    mean = m.mean
    assert torch.equal(cpu.normalize(neg(x), neg(mean), neg(invstd), neg(w), neg(b)),
                       cpu.normalize(x, mean, invstd, w, b))  # fmt: skip
    sums, sums_neg = cpu.grad_sums(dy, x, mean, invstd), cpu.grad_sums(neg(dy), neg(x), neg(mean), neg(invstd))
    assert all(torch.equal(a, e) for a, e in zip(sums, sums_neg))
    assert torch.equal(cpu.grad_input(dy, x, mean, invstd, w, *sums, m.count),
                       cpu.grad_input(neg(dy), neg(x), mean, invstd, neg(w), neg(sums[0]), neg(sums[1]), m.count))
    back = cpu.backward(dy, x, mean, invstd, w, m.count, True)
    back_neg = cpu.backward(neg(dy), neg(x), neg(mean), neg(invstd), neg(w), m.count, True)
    assert all(torch.equal(a, e) for a, e in zip(back, back_neg))


def _vectors():
    """(name, tensor): (C,) vectors and near-misses for the compiled vector check."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Tagged(torch.Tensor):
        pass

    base = torch.randn(8)
    with FakeTensorMode():
        fake = torch.randn(8)
    yield "plain", base
    yield "parameter", torch.nn.Parameter(torch.randn(8))
    yield "float64", base.double()
    yield "bfloat16", base.bfloat16()
    yield "offset", torch.randn(9)[1:]
    yield "step-sliced", torch.randn(16)[::2]
    yield "negative bit", torch._neg_view(base)
    yield "plain subclass", base.as_subclass(Tagged)
    yield "fake", fake
    yield "meta", torch.empty(8, device="meta")
    yield "two dims", torch.randn(2, 4)
    yield "integers", torch.arange(8)
    yield "empty", torch.empty(0)


@pytest.mark.parametrize("name,v", list(_vectors()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_compiled_vector_check_agrees_with_the_python_checks(name, v):
    """cpu_arguments.param and is_plain_vector ask the extension module's bn_plain_vector first (one
    call instead of 0.6-0.8 us of tensor queries); it must take exactly the vectors the Python
    checks take as they are, and give their pointer and dtype code."""
    from bnlab._memory import memory_readable
    from bnlab.backends import cpu_arguments as cpu

    bnlab.BatchNorm1d(3)(torch.randn(4, 3))  # the whole calls set up
    if not cpu.compiled_vector_check():
        pytest.skip("no extension module here")
    plain = (type(v) in (torch.Tensor, torch.nn.Parameter) and v.is_cpu and v.dim() == 1 and v.stride(0) == 1
             and not v.is_neg() and memory_readable(v) and v.dtype in cpu._CODE)  # fmt: skip
    got = cpu._plain_vector(v)
    assert (got is not None) == plain, name
    if plain:
        assert got == (v.data_ptr(), cpu._CODE[v.dtype]), name
