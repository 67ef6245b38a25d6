"""bnlab's layers under torch.compile and torch.export (bnlab.custom_ops).

Oracle: the same layer run eagerly, which computes the bits of torch.nn within the conformance
tests' bounds. A compiled layer must give those eager bits (outputs, every gradient, the running
averages and num_batches_tracked) with its graph whole (``fullgraph=True`` fails on any graph
break). The compiler backend is ``aot_eager``: Dynamo, AOTAutograd and the fake implementations
as inductor sees them, without code generation; one test runs inductor itself.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

import bnlab
from bnlab import custom_ops, custom_ops_batch_stats, custom_ops_sync
from bnlab.custom_ops import _strided_as_fake

pytestmark = pytest.mark.skipif(not custom_ops.AVAILABLE, reason="torch.library.custom_op needs torch >= 2.4")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each case compiles the same forward code again; Dynamo's per-code cache (8 entries) would fill.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bits(t):
    """A tensor (or None) as comparable exact content: dtype, shape, strides and bytes."""
    if t is None:
        return None
    return (t.dtype, tuple(t.shape), t.stride(), t.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def _step(layer, x, dy, *extra):
    """One forward and backward: [y, dx, d(extra)..., parameter grads..., buffers...] as bits."""
    x = x.detach().requires_grad_(True)
    extra = [e.detach().requires_grad_(True) for e in extra]
    y = layer(x, *extra)
    y.backward(dy)
    found = [y, x.grad, *(e.grad for e in extra), *(p.grad for p in layer.parameters()), *layer.buffers()]
    layer.zero_grad(set_to_none=True)
    return [_bits(t) for t in found]


def _pair(layer):
    """(eager layer, compiled copy's module, compiled callable) with equal random parameters."""
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    twin = copy.deepcopy(layer)
    return layer, twin, torch.compile(twin, backend="aot_eager", fullgraph=True)


LAYERS = {
    "2d NCHW": (lambda: bnlab.BatchNorm2d(16), (8, 16, 6, 6), torch.float32, torch.contiguous_format),
    "2d channels_last": (lambda: bnlab.BatchNorm2d(16), (8, 16, 6, 6), torch.float32, torch.channels_last),
    "2d bf16": (lambda: bnlab.BatchNorm2d(8, dtype=torch.bfloat16), (4, 8, 5, 5), torch.bfloat16, None),
    "2d fp32 layer, bf16 input": (lambda: bnlab.BatchNorm2d(8), (4, 8, 5, 5), torch.bfloat16, None),
    "1d (N, C), momentum None": (lambda: bnlab.BatchNorm1d(10, momentum=None), (32, 10), torch.float32, None),
    "1d (N, C, L), affine False": (lambda: bnlab.BatchNorm1d(5, affine=False), (4, 5, 7), torch.float32, None),
    "1d bias False": (lambda: bnlab.BatchNorm1d(6, bias=False), (9, 6), torch.float32, None),
    "3d, no running stats": (lambda: bnlab.BatchNorm3d(3, track_running_stats=False), (2, 3, 4, 5, 6), torch.float32, None),
    "SyncBatchNorm, one process": (lambda: bnlab.SyncBatchNorm(4), (6, 4, 3, 3), torch.float32, None),
    # two ghost batches of 3 regrouped into one call, and a last one of 2
    "Ghost BN, a smaller last ghost batch": (lambda: bnlab.BatchNorm2d(4, virtual_batch_size=3), (8, 4, 5, 5), torch.float32, None),
    "Ghost BN channels_last": (lambda: bnlab.BatchNorm2d(4, virtual_batch_size=2), (6, 4, 3, 5), torch.float32, torch.channels_last),
    "Ghost BN 1d, momentum None": (lambda: bnlab.BatchNorm1d(7, virtual_batch_size=4, momentum=None), (16, 7), torch.float32, None),
    # the running averages move on the second step only, with both batches' statistics merged
    "accumulated statistics": (lambda: bnlab.BatchNorm2d(4, accumulation_steps=2), (4, 4, 3, 3), torch.float32, None),
    # r and d clipped: the batches (mean 1, std 3) are far from the running statistics
    "Batch Renorm": (lambda: bnlab.BatchNorm2d(4, renorm=True, rmax=1.5, dmax=0.5), (8, 4, 5, 5), torch.float32, None),
    "Batch Renorm, ghost batches, ramped limits": (
        lambda: bnlab.BatchNorm2d(4, renorm=True, virtual_batch_size=3, renorm_ramp=(0, 4)), (8, 4, 3, 3), torch.float32,
        torch.channels_last,
    ),
    "Batch Renorm 1d, no affine": (lambda: bnlab.BatchNorm1d(6, renorm=True, affine=False, rmax=2.0, dmax=1.0), (12, 6), torch.float32, None),
}


@pytest.mark.parametrize("case", LAYERS)
def test_a_compiled_layer_computes_the_eager_bits(case):
    make, shape, dtype, fmt = LAYERS[case]
    eager, twin, compiled = _pair(make())
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # the running averages and the counter carry over between steps
        x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
        x = x.contiguous(memory_format=fmt) if fmt is not None else x
        dy = torch.randn(shape, generator=gen).to(dtype)
        assert _step(compiled, x, dy) == _step(eager, x, dy), f"training step {step}"
    eager.eval(), twin.eval()
    with torch.no_grad():  # inference
        assert _bits(compiled(x)) == _bits(eager(x))
    assert _step(compiled, x, dy) == _step(eager, x, dy)  # eval with a graph: frozen statistics


def test_a_layer_without_an_accumulator_yet_accumulates_under_compile():
    # As a layer unpickled from a bnlab that made the accumulator at first use: the compiled layer
    # makes it, and must keep it across calls (it once made a new one per call, silently).
    eager, twin, compiled = _pair(bnlab.BatchNorm2d(3, accumulation_steps=2))
    for layer in (eager, twin):
        del layer.__dict__["_stats_accumulator"]
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        x, dy = torch.randn(4, 3, 2, 2, generator=gen) * 2 + 1, torch.randn(4, 3, 2, 2, generator=gen)
        assert _step(compiled, x, dy) == _step(eager, x, dy), f"step {step}"
    assert int(twin.num_batches_tracked) == 2


def test_functional_batch_norm_compiles_to_the_eager_bits():
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(6, 4, 5, generator=gen), torch.randn(6, 4, 5, generator=gen)
    w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)

    def run(f, training):
        again = torch.Generator().manual_seed(3)
        stats = [torch.randn(4, generator=again), torch.rand(4, generator=again) + 0.5]
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = f(xs, *stats, ws, bs, training, 0.3, 1e-3)
        y.backward(dy)
        return [_bits(t) for t in (y, xs.grad, ws.grad, bs.grad, *stats)]

    def f(*args):
        return bnlab.functional.batch_norm(*args)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for training in (True, False):
        assert run(compiled, training) == run(f, training)


def _graph_targets(model, *inputs):
    """The call targets of the graphs torch.compile hands its backend for model(*inputs)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(model, backend=recording_backend, fullgraph=True)(*inputs)
    assert len(graphs) == 1
    return {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}


def test_each_layer_is_one_node_of_one_graph():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), bnlab.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), bnlab.BatchNormAct2d(4)
    )
    x = torch.randn(2, 3, 8, 8)
    targets = _graph_targets(model, x)
    assert f"bnlab.batch_norm_train.{custom_ops.OVERLOAD}" in targets
    assert not any("batch_norm_eval" in t for t in targets)
    torch._dynamo.reset()
    targets = _graph_targets(model.eval(), x)
    assert f"bnlab.batch_norm_eval.{custom_ops.OVERLOAD}" in targets and not any("train" in t for t in targets)


def test_batch_norm_act_with_a_residual_compiles_to_the_eager_bits():
    eager, twin, compiled = _pair(bnlab.BatchNormAct2d(4, residual=True))
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        x, res, dy = (torch.randn(3, 4, 5, 5, generator=gen) for _ in range(3))
        assert _step(compiled, x, dy, res) == _step(eager, x, dy, res)
    eager.eval(), twin.eval()
    assert _step(compiled, x, dy, res) == _step(eager, x, dy, res)


@pytest.mark.parametrize(
    "options", [{}, {"virtual_batch_size": 2}, {"renorm": True, "rmax": 1.5, "dmax": 0.5}], ids=["plain", "ghost", "renorm"]
)
def test_dynamic_shapes_give_the_eager_bits_at_every_batch_size(options):
    eager = bnlab.BatchNorm2d(4, **options)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    for n in (3, 5, 8):
        x, dy = torch.randn(n, 4, 5, 5, generator=gen) * 2 + 1, torch.randn(n, 4, 5, 5, generator=gen)
        assert _step(compiled, x, dy) == _step(eager, x, dy), n


def test_a_non_finite_batch_is_skipped_and_not_counted_as_in_eager():
    eager, twin, compiled = _pair(bnlab.BatchNorm1d(3, momentum=None))
    gen = torch.Generator().manual_seed(6)
    for k in range(3):
        x = torch.randn(6, 3, generator=gen)
        if k == 1:
            x[0, 1] = float("nan")
        eager(x), compiled(x)
    assert int(twin.num_batches_tracked) == 2
    assert [_bits(b) for b in twin.buffers()] == [_bits(b) for b in eager.buffers()]


@pytest.mark.parametrize(
    "layout",
    ["permuted (N, H, C, W)", "sliced", "expanded"],
)
def test_outputs_keep_the_eager_strides_for_odd_layouts(layout):
    base = torch.randn(4, 6, 3, 10, generator=torch.Generator().manual_seed(7))
    x = {
        "permuted (N, H, C, W)": base.permute(0, 2, 1, 3),
        "sliced": base.transpose(1, 2)[:, :, ::2, 1:],
        "expanded": base[:1, :3].expand(4, 3, 3, 10),
    }[layout]
    eager, twin, compiled = _pair(bnlab.BatchNorm2d(3))
    # dy in x's layout: AOTAutograd hands the backward its gradient in the forward output's layout,
    # and for these layouts (the portable backend's torch reductions) the sums' order follows dy's.
    dy = torch.empty_like(x).copy_(torch.randn(x.shape))
    assert _step(compiled, x, dy) == _step(eager, x, dy)


def test_strided_as_fake_restrides_only_what_the_fake_would_not_promise():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    same = torch.empty_like(x)
    assert _strided_as_fake(same, x) is same
    other = x.contiguous()  # NCHW strides where channels_last is promised
    fixed = _strided_as_fake(other, x)
    assert fixed.stride() == x.stride() and torch.equal(fixed, other)


def test_a_negative_running_variance_raises_under_compile_naming_it():
    layer = bnlab.BatchNorm2d(3).eval()
    layer.running_var[1] = -1.0
    with pytest.raises(ValueError, match="running_var"):
        torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(2, 3, 4, 4))


def test_masked_bn_compiles_to_the_eager_bits():
    # The statistics of the selected positions only (torch ops), every position normalized with
    # them through bnlab::batch_norm_given_stats, whose backward differentiates through them.
    eager, twin, compiled = _pair(bnlab.BatchNorm2d(4))
    gen = torch.Generator().manual_seed(5)

    def step(layer, x, mask, dy):
        x = x.detach().requires_grad_(True)
        y = layer(x, mask)
        y.backward(dy)
        found = [y, x.grad, *(p.grad for p in layer.parameters()), *layer.buffers()]
        layer.zero_grad(set_to_none=True)
        return [_bits(t) for t in found]

    for n in range(3):
        x, dy = torch.randn(6, 4, 5, 5, generator=gen) * 2 + 1, torch.randn(6, 4, 5, 5, generator=gen)
        mask = torch.rand(6, 5, 5, generator=gen) > 0.4
        x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding: must not leak into anything selected
        assert step(compiled, x, mask, dy) == step(eager, x, mask, dy), f"step {n}"


def test_export_of_an_eval_model_holds_the_operator_and_the_eager_bits():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bnlab.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    assert any("bnlab.batch_norm_eval" in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        assert _bits(exported.module()(x)) == _bits(model(x))


@pytest.mark.parametrize("base", [bnlab.BatchNorm2d, bnlab.BatchNormAct2d])
def test_a_subclass_with_its_own_input_check_exports_with_the_operator(base):
    """A subclass's own _check_input_dim takes the eager general path (modules.py); the fused
    layer's traced route must stay the operator (the fiftieth session's first version sent it to
    the eager kernels, and export failed on their data pointers)."""

    class FourDimensional(base):
        def _check_input_dim(self, input):
            if input.dim() != 4:
                raise ValueError("custom: 4D only")

    layer = FourDimensional(4).eval()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5)
    exported = torch.export.export(layer, (x,))
    assert any("bnlab.batch_norm_eval" in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        assert _bits(exported.module()(x)) == _bits(layer(x))


def test_inductor_reads_the_outputs_as_promised():
    # Inductor generates code for the ReLU after BN (and the ReLU's backward), reading BN's output with the
    # strides of the fake implementation: wrong strides there would scramble the values.
    model = nn.Sequential(bnlab.BatchNorm2d(4), nn.ReLU())
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    gen = torch.Generator().manual_seed(8)
    for x in (torch.randn(4, 4, 10, 10, generator=gen).contiguous(memory_format=torch.channels_last),
              torch.randn(4, 10, 4, 10, generator=gen).transpose(1, 2)):  # fmt: skip
        dy = torch.randn(x.shape, generator=gen)
        assert _step(compiled, x, dy) == _step(model, x, dy)


def test_inductor_keeps_batch_renorm_gradients():
    # Inductor's own partitioner and code for r, d and γ·r, β + γ·d: its backward must read the r
    # and d of the forward, not values recomputed from running averages the forward has updated.
    eager = bnlab.BatchNorm2d(4, renorm=True, rmax=1.5, dmax=0.5)
    eager, twin, _ = _pair(eager)
    compiled = torch.compile(twin, fullgraph=True)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        x, dy = torch.randn(6, 4, 3, 3, generator=gen) * 3 + 1, torch.randn(6, 4, 3, 3, generator=gen)
        assert _step(compiled, x, dy) == _step(eager, x, dy), f"step {step}"


_SCHEMAS = {**custom_ops._SCHEMAS, **custom_ops_batch_stats.SCHEMAS, **custom_ops_sync.SCHEMAS}
_OPERATORS = tuple(_SCHEMAS)


def _operator(name: str):
    return getattr(getattr(torch.ops.bnlab, name), custom_ops.OVERLOAD)


def test_the_operators_take_any_layout():
    # Without the tag inductor converted its channels-last convolution outputs to NCHW before
    # each BN call and back after it: two extra passes per layer (docs/benchmarks.md).
    for name in _OPERATORS:
        assert torch.Tag.flexible_layout in _operator(name).tags, name


def test_the_overload_name_moves_with_the_operators_contract():
    # torch.compile's on-disk caches key a graph by its code, where only the operator's name and
    # overload appear: a graph compiled against an older definition would be reused. A change to
    # a schema or the tags must come with a new custom_ops.OVERLOAD (then update both values here);
    # a new operator (no older graph can call it) changes the digest only.
    contract = "\n".join(f"{_SCHEMAS[n]} {sorted(t.name for t in _operator(n).tags)}" for n in _OPERATORS)
    digest = hashlib.sha256(contract.encode()).hexdigest()[:16]
    assert (custom_ops.OVERLOAD, digest) == ("v3", "325a968c3f7fe6d1"), contract
    assert not hasattr(torch.ops.bnlab.batch_norm_train, "default")  # no older overload left to call


def test_a_compiled_graph_names_the_overload():
    # What makes the caches' key move: the overload's name in the graph's code.
    codes = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm

    torch.compile(bnlab.BatchNorm2d(3), backend=capture, fullgraph=True)(torch.randn(2, 3, 4, 4))
    assert f"torch.ops.bnlab.batch_norm_train.{custom_ops.OVERLOAD}(" in codes[0]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_cpu_one_call_forward_equals_the_composition_it_replaces(momentum, fmt):
    # CpuBackend.train_forward_stats (one kernel call, buffers updated in it) against the base
    # class's forward_train + count_and_update_ on the same backend: the same bits everywhere.
    from bnlab.backends import get_backend
    from bnlab.backends.base import Backend

    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 5, 7, 3, generator=gen) * 4 + 2).contiguous(memory_format=fmt)
    w, b = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    results = []
    for forward in (cpu.train_forward_stats, lambda *a: Backend.train_forward_stats(cpu, *a)):
        buffers = [torch.randn(5, generator=torch.Generator().manual_seed(10)), torch.rand(5) * 0 + 2.0,
                   torch.tensor(3)]  # fmt: skip
        y, stats = forward(x, w, b, 1e-5, *buffers[:2], momentum, buffers[2], True)
        results.append([_bits(t) for t in (y, stats, *buffers)])
    assert results[0] == results[1]
