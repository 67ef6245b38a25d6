"""bnlab's Triton kernels, run by Triton's interpreter on CPU tensors, against the float64 reference.

TRITON_INTERPRET=1 must be set before Triton is imported: tests/conftest.py sets it, and so does
this module (for a run without the conftest). The interpreter is slow: shapes are small, but odd
and prime, and reach every kernel variant (NCL rows, channels-last tiles, several segments per
channel, masked tails).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bnlab  # noqa: E402
from bnlab import elementwise  # noqa: E402
from bnlab import reference as ref  # noqa: E402
from bnlab.backends import _REGISTRY, PortableBackend  # noqa: E402
from bnlab.backends.triton_backend import TritonBackend  # noqa: E402
from bnlab.backends.triton_grad import centre_shift  # noqa: E402
from speed_helpers import (  # noqa: E402
    STEP_AND_EVAL,
    TOL,
    assert_backend_matches_reference,
    assert_close,
    assert_fused_relu_handles_nan_as_torch,
    make_input,
    np64,
    step_and_eval,
    to_layout,
)

TRITON = TritonBackend(allow_cpu=True)
CASES = [((5, 3, 7, 6), "nchw"), ((11, 1, 13), "nchw"), ((9, 5), "nchw"), ((4, 6, 3, 5), "cl"), ((3, 7, 2, 3, 2), "cl")]


@pytest.fixture(autouse=True, params=["one program", "general"])
def small_input_kernels(request, monkeypatch):
    """Every test twice: small rows of channels through the one-program kernels (triton_small),
    and through the general ones (the threshold at 0), so that both stay covered."""
    from bnlab.backends import triton_ops

    if request.param == "general":
        monkeypatch.setattr(triton_ops, "SMALL_NUMEL", 0)
    return request.param


@pytest.fixture
def triton_everywhere():
    """Route CPU float tensors to the interpreted Triton backend for the duration of a test."""
    saved = list(_REGISTRY)
    _REGISTRY[:] = [TRITON, PortableBackend()]
    yield
    _REGISTRY[:] = saved


def test_import_bnlab_never_imports_triton():
    code = "import sys, torch, bnlab; bnlab.BatchNorm1d(3)(torch.randn(4, 3)); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_match_reference(shape, layout, dtype):
    assert_backend_matches_reference(TRITON, shape, layout, dtype)


@pytest.mark.parametrize("shape,layout", CASES[:2] + CASES[3:4])
def test_primitives_match_reference(shape, layout):
    """The four primitives (SyncBatchNorm composes them) against float64 NumPy."""
    x = make_input(shape, layout, seed=3, mean=-1.0, std=3.0)
    dy = make_input(shape, layout, seed=4)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    stats = ref.moments(np64(x))
    moments = TRITON.moments(x)
    assert moments.count == stats.count
    assert_close(moments.mean, stats.mean, 1e-9, "moments mean")
    assert_close(moments.m2 / stats.count, stats.m2 / stats.count, 1e-9, "moments M2")
    mean = torch.as_tensor(stats.mean)
    invstd = torch.rsqrt(torch.as_tensor(stats.m2) / stats.count + 1e-5)
    expected_y, cache = ref.forward_train(np64(x), np64(w), np64(b))
    assert_close(TRITON.normalize(x, mean, invstd, w, b), expected_y, 2e-6, "normalize")
    axes = (0,) + tuple(range(2, x.dim()))
    g, xh = np64(dy), cache.x_hat
    sum_dy, sum_dy_xhat = TRITON.grad_sums(dy, x, mean, invstd)
    n = stats.count
    assert_close(sum_dy / n, g.sum(axes) / n, 1e-6, "sum dy")
    assert_close(sum_dy_xhat / n, (g * xh).sum(axes) / n, 1e-6, "sum dy*xhat")
    expected_dx = ref.backward(g, cache)[0]
    dx = TRITON.grad_input(dy, x, mean, invstd, w, torch.as_tensor(g.sum(axes)), torch.as_tensor((g * xh).sum(axes)), n)
    assert_close(dx, expected_dx, 2e-6, "grad_input")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_training_step_matches_torch(triton_everywhere, momentum):
    """The fused training Function: output, gradients, running averages and the batch counter."""
    ours, theirs = bnlab.BatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    for step in range(2):
        x = make_input((4, 3, 5, 3), "cl" if step else "nchw", seed=5 + step, mean=step)
        dy = make_input((4, 3, 5, 3), "nchw", seed=7 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        y1.backward(dy)
        y2.backward(dy)
        assert_close(y1, y2, 2e-4, "output")
        assert_close(x1.grad, x2.grad, 2e-4, "grad x")
        assert_close(ours.weight.grad, theirs.weight.grad, 2e-4, "grad weight")
        assert_close(ours.bias.grad, theirs.bias.grad, 2e-4, "grad bias")
        assert_close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
        assert_close(ours.running_var, theirs.running_var, 1e-6, "running_var")
        assert int(ours.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        x = make_input((4, 3, 5, 3), seed=9)
        assert_close(ours(x), theirs(x), 2e-4, "eval output")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_with_half_precision_parameters(triton_everywhere, dtype):
    """model.to(bfloat16): weight, bias and running averages in 16 bits, written by the kernels
    from float64 (the interpreter once turned 1.0 into 9e-41 on that cast)."""
    ours, theirs = bnlab.BatchNorm2d(3).to(dtype), torch.nn.BatchNorm2d(3).to(dtype)
    x = make_input((4, 3, 5, 3), "cl", dtype, seed=21, mean=0.5, std=2.0)
    dy = make_input((4, 3, 5, 3), "cl", dtype, seed=22)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).backward(dy)
    theirs(x2).backward(dy)
    assert ours.weight.grad.dtype == ours.running_var.dtype == dtype
    assert_close(x1.grad, x2.grad, TOL[dtype], "grad x")
    assert_close(ours.weight.grad, theirs.weight.grad, TOL[dtype], "grad weight")
    assert_close(ours.bias.grad, theirs.bias.grad, TOL[dtype], "grad bias")
    # running averages against float64 (torch rounds its momentum arithmetic in 16 bits): within
    # one rounding of the 16-bit result
    x64 = x.double()
    expected_mean = 0.1 * x64.mean((0, 2, 3))
    expected_var = 0.9 + 0.1 * x64.var((0, 2, 3), unbiased=True)
    half_ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert_close(ours.running_mean, expected_mean, half_ulp, "running_mean")
    assert_close(ours.running_var, expected_var, half_ulp * float(expected_var.abs().max()), "running_var")
    ours.eval()
    with torch.no_grad():
        z = make_input((4, 3, 5, 3), "cl", dtype, seed=23)
        expected = (z.double() - ours.running_mean.double().view(1, 3, 1, 1)) / torch.sqrt(
            ours.running_var.double().view(1, 3, 1, 1) + 1e-5
        )
        assert_close(ours(z), expected * ours.weight.double().view(1, 3, 1, 1), TOL[dtype], "eval output")


@pytest.mark.parametrize("residual", [False, True])
def test_fused_bn_add_relu_matches_torch_sequence(triton_everywhere, residual):
    ours = bnlab.BatchNormAct2d(3, residual=residual)
    theirs = torch.nn.BatchNorm2d(3)
    x = make_input((4, 3, 5, 3), "cl", seed=11)
    res = make_input((4, 3, 5, 3), "cl", seed=12) if residual else None
    dy = make_input((4, 3, 5, 3), "cl", seed=13)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    r1, r2 = (res.clone().requires_grad_(), res.clone().requires_grad_()) if residual else (None, None)
    y1 = ours(x1, r1) if residual else ours(x1)
    y2 = torch.relu(theirs(x2) + (r2 if residual else 0))
    y1.backward(dy)
    y2.backward(dy)
    assert_close(y1, y2, 2e-4, "output")
    assert_close(x1.grad, x2.grad, 2e-4, "grad x")
    if residual:
        assert_close(r1.grad, r2.grad, 2e-4, "grad residual")
    assert_close(ours.weight.grad, theirs.weight.grad, 2e-4, "grad weight")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        out = ours(x, res) if residual else ours(x)
        assert_close(out, torch.relu(theirs(x) + (res if residual else 0)), 2e-4, "eval output")


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((2, 3, 7, 10), "nchw"),  # rows of 70 positions: two 64-wide tiles, the second starting at byte 8 of 9
        ((3, 2, 1, 3), "nchw"),  # rows of 3: tiles narrower than a byte
        ((2, 70, 2, 3), "cl"),  # 70 channels: two channel blocks, the second starting at byte 8
        ((3, 20, 3, 2), "cl"),  # 20 channels: one 32-wide block over 3 bytes
    ],
)
def test_fused_backward_reads_the_mask_under_every_tile(triton_everywhere, shape, layout):
    """The backward kernels read the ReLU mask a byte per 8 positions; every tile shape, against torch."""
    channels = shape[1]
    ours, theirs = bnlab.BatchNormAct2d(channels, residual=True), torch.nn.BatchNorm2d(channels)
    x, res, dy = (make_input(shape, layout, seed=s) for s in (31, 32, 33))
    x1, x2, r1, r2 = (t.clone().requires_grad_() for t in (x, x, res, res))
    y1, y2 = ours(x1, r1), torch.relu(theirs(x2) + r2)
    y1.backward(dy)
    y2.backward(dy)
    assert 0.2 < float((y2 > 0).float().mean()) < 0.8  # both sides of the ReLU in every tile
    assert_close(y1, y2, 2e-4, "output")
    for name, ours_grad, their_grad in (("x", x1.grad, x2.grad), ("residual", r1.grad, r2.grad),
                                        ("weight", ours.weight.grad, theirs.weight.grad),
                                        ("bias", ours.bias.grad, theirs.bias.grad)):  # fmt: skip
        assert_close(ours_grad, their_grad, 2e-4, f"grad {name}")


def test_fused_relu_keeps_nan_and_its_gradient_as_torch(triton_everywhere):
    # tl.maximum(z, 0) returned 0 for a NaN z, and the mask's bit of z > 0 stopped dy there
    assert_fused_relu_handles_nan_as_torch()


def test_mask_holds_one_bit_per_element():
    from bnlab.fused import _unpack_bits

    for layout in ("cl", "nchw"):  # rows of 2 channels / of 35 positions: partial bytes at every row end
        x = make_input((3, 2, 7, 5), layout, seed=14)
        y, (stats, hi, mask, plan) = TRITON.act_forward(x, None, None, 1e-5, None, None, 0.1, None, False, None, True)
        assert mask.dtype == torch.uint8 and mask.numel() == plan.rows * ((plan.k + 7) // 8) < x.numel()
        z = torch.as_tensor(ref.forward_train(np64(x))[0])
        assert torch.equal(_unpack_bits(mask, x, plan.rows, plan.k), z > 0)
        assert_close(y, torch.relu(z), 2e-4, "relu output")


def test_precision_rules():
    x = make_input((40, 2, 3, 3), seed=15, mean=1000.0, std=0.01)
    y, stats, _ = TRITON.forward_train(x, None, None, 1e-5)
    assert_close(y, ref.forward_train(np64(x))[0], 2e-4, "output at 1e3 ± 0.01")
    big = make_input((40, 2, 3, 3), "cl", seed=16, mean=1e18, std=3e17)
    y, stats, _ = TRITON.forward_train(big, None, None, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(stats.m2).all()
    x[5, 1, 1, 1] = float("nan")
    x[:, 0] = 123.456
    beta = torch.tensor([0.25, 0.0])
    y, _, _ = TRITON.forward_train(x, None, beta, 1e-5)
    assert torch.isnan(y[:, 1]).all()
    assert torch.equal(y[:, 0], torch.full_like(y[:, 0], 0.25)), "a constant channel must give exactly beta"


def test_double_backward_of_the_fused_layer_matches_the_generic_path(triton_everywhere):
    """create_graph=True unpacks the 1-bit mask and differentiates BN's backward with torch ops."""
    x = make_input((4, 3, 3, 5), "cl", seed=17)

    def second_order(layer):
        xg = x.clone().requires_grad_()
        res = (x.flip(0) * 0.5).requires_grad_()
        y = layer(xg, res)
        (g,) = torch.autograd.grad((y * y).sum(), xg, create_graph=True)
        (g * g).sum().backward()
        return xg.grad, res.grad

    fused = second_order(bnlab.BatchNormAct2d(3, residual=True))
    _REGISTRY[:] = [PortableBackend()]
    generic = second_order(bnlab.BatchNormAct2d(3, residual=True))
    assert_close(fused[0], generic[0], 2e-4, "second-order grad x")
    assert_close(fused[1], generic[1], 2e-4, "second-order grad residual")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_running_update_guard_and_counter(triton_everywhere):
    """On the device: the batch counter, momentum=None as 1/count, and the non-finite guard."""
    layer = bnlab.BatchNorm2d(3, momentum=None)
    first = make_input((4, 3, 3, 5), seed=18, mean=2.0)
    layer(first)
    assert int(layer.num_batches_tracked) == 1
    assert_close(layer.running_mean, ref.moments(np64(first)).mean, 1e-6, "first batch, factor 1")
    before = layer.running_var.clone()
    bad = make_input((4, 3, 3, 5), seed=19)
    bad[0, 1, 0, 0] = float("inf")
    layer(bad)
    assert int(layer.num_batches_tracked) == 1 and torch.equal(layer.running_var, before)


def test_first_use_check_passes_on_working_kernels():
    backend = TritonBackend(allow_cpu=True, self_check=True)
    assert backend.supports(torch.zeros(2, 3))
    assert backend.error is None


def test_failing_kernels_are_declined_with_a_warning_not_a_crash(monkeypatch):
    backend = TritonBackend(allow_cpu=True, self_check=True)
    ops = backend.ops()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")  # what a compiler rejecting a kernel looks like

    monkeypatch.setattr(ops, "forward_train", broken)
    with pytest.warns(RuntimeWarning, match="failed their first-use check.*PTX assembly failed.*portable"):
        assert not backend.supports(torch.zeros(2, 3))
    assert not backend.supports(torch.zeros(4, 5)), "the decision is remembered per device"


def test_kernels_that_disagree_are_declined(monkeypatch):
    backend = TritonBackend(allow_cpu=True, self_check=True)
    ops = backend.ops()
    original = ops.forward_train

    def off_by_a_little(*args, **kwargs):
        y, *rest = original(*args, **kwargs)
        return (y * 1.01 if y is not None else y), *rest

    monkeypatch.setattr(ops, "forward_train", off_by_a_little)
    with pytest.warns(RuntimeWarning, match="y differs from the portable backend"):
        assert not backend.supports(torch.zeros(2, 3))


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # the interpreter's NumPy, on -0.5
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape,layout,one_launch", [((3, 5, 4, 7), "cl", False), ((3, 5, 6, 7), "nchw", True)])
def test_eval_refuses_a_negative_running_variance(triton_everywhere, fused, shape, layout, one_launch):
    """The eval coefficient kernel, or eval_kernel's first program, reports negative variances; the
    error names the channels."""
    from bnlab.backends import triton_ops

    layer = (bnlab.BatchNormAct2d(5) if fused else bnlab.BatchNorm2d(5)).eval()
    x = make_input(shape, layout, seed=41)
    assert triton_ops.eval_one_launch(triton_ops.plan(x)) == one_launch
    with torch.no_grad():
        expected = layer(x)  # all variances 1: fine
        assert_close(expected, torch.relu(x / (1 + 1e-5) ** 0.5) if fused else x / (1 + 1e-5) ** 0.5, 2e-4, "eval")
        layer.running_var[3] = -0.5
        with pytest.raises(ValueError, match=r"running_var.*channels \[3\]"):
            layer(x)
        layer.running_var[3] = 0.0  # zero is a variance: accepted
        layer(x)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_eval_coefficients_cover_channels_beyond_one_block(triton_everywhere):
    """1100 channels: the eval coefficient kernel's second pass over channel blocks (1024 per block)."""
    layer = bnlab.BatchNorm1d(1100).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1, 1, 1100))
        layer.running_var.copy_(torch.linspace(0.5, 2, 1100))
        layer.weight.copy_(torch.linspace(2, 3, 1100))
        x = make_input((3, 1100), seed=42)
        expected = (x.double() - layer.running_mean.double()) / torch.sqrt(layer.running_var.double() + 1e-5)
        assert_close(layer(x), expected * layer.weight.double() + layer.bias.double(), 2e-4, "eval output")
        layer.running_var[1050] = -1.0
        with pytest.raises(ValueError, match=r"channels \[1050\]"):
            layer(x)


def test_small_rows_of_channels_take_one_launch_each_way(small_input_kernels, monkeypatch):
    """(N, C) inputs of at most SMALL_NUMEL values: one program forward and one backward; larger
    inputs, NCL inputs and the fused layer's mask take the general kernels."""
    from bnlab.backends import triton_ops

    taken = []
    for name in ("_small_forward", "_small_backward", "_partial_stats", "_partial_grads", "_normalize"):
        original = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    for shape, layout in (((40, 6), "nchw"), ((4, 6, 3, 5), "cl"), ((4, 6, 3, 5), "nchw")):
        taken.clear()
        x = make_input(shape, layout, seed=43)
        dy = make_input(shape, layout, seed=44)
        y, stats, coef, _ = triton_ops.forward_train(x, None, None, 1e-5)
        triton_ops.backward(dy, x, stats, coef[0], None)
        mean, var = stats[0], stats[1] / (x.numel() // shape[1])  # the batch's (biased) variance
        y_eval, ok = triton_ops.normalize_with(x, mean, var, None, None, 0.0, given_invstd=False)
        nlc = shape == (40, 6) or layout == "cl"
        small = nlc and small_input_kernels == "one program"
        general = ["_partial_stats", "_normalize", "_partial_grads", "_normalize"]
        assert taken == (["_small_forward", "_small_backward"] if small else general), shape
        z = torch.as_tensor(ref.forward_train(np64(x))[0])
        assert_close(y, z, 2e-4, "output")
        assert_close(y_eval, z, 2e-4, "eval output with the batch's own statistics")
        assert int(ok) == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's NumPy on inf - inf
@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_program_running_averages_and_guard(triton_everywhere, guard, momentum):
    """The running averages, the batch counter and the non-finite guard of the one-program forward
    against torch.nn (a finite batch) and against nothing changing (a batch with an infinity)."""
    ours, theirs = bnlab.BatchNorm1d(7, momentum=momentum), torch.nn.BatchNorm1d(7, momentum=momentum)
    ours.skip_nonfinite = guard
    for seed in (45, 46):
        x = make_input((30, 7), seed=seed)
        ours(x)
        theirs(x)
    assert_close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    assert_close(ours.running_var, theirs.running_var, 1e-6, "running_var")
    assert int(ours.num_batches_tracked) == 2
    before = (ours.running_mean.clone(), ours.running_var.clone())
    bad = make_input((30, 7), seed=47)
    bad[3, 2] = float("inf")
    ours(bad)
    if guard:  # one channel's statistics are not finite: nothing changes, the counter included
        assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
        assert int(ours.num_batches_tracked) == 2
    else:
        assert not torch.isfinite(ours.running_var[2]) and int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("shape,layout", [((40, 3), "nchw"), ((6, 3, 4, 5), "nchw"), ((6, 3, 4, 5), "cl")])
def test_gradients_at_a_large_mean_keep_their_precision(shape, layout):
    """Data at 1e3 ± 0.01: dx's coefficients carry the mean's float32 rounding (lo) explicitly;
    dropped or with the wrong sign, dx would be off by about 1e-2 of its size."""
    x = make_input(shape, layout, seed=48, mean=1000.0, std=0.01)
    dy = make_input(shape, layout, seed=49)
    w = torch.rand(shape[1]) + 0.5
    y, stats, invstd = TRITON.forward_train(x, w, None, 1e-5)
    dx, dw, _ = TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True)
    expected_y, cache = ref.forward_train(np64(x), np64(w), None)
    expected_dx, expected_dw, _ = ref.backward(np64(dy), cache)
    assert_close(y, expected_y, 2e-4, "y")
    assert_close(dx, expected_dx, 2e-4, "dx")
    assert_close(dw, expected_dw, 2e-4, "dweight")


@pytest.mark.parametrize("batch_mean", [True, False], ids=["centred", "whole-dy"])
@pytest.mark.parametrize("shape,layout", [((40, 3), "nchw"), ((6, 3, 4, 5), "nchw"), ((6, 4, 4, 5), "cl")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dx_of_channels_constant_in_x_and_dy_is_exactly_zero(shape, layout, dtype, batch_mean):
    """dy's mean comes off before the product (docs/math.md §4.2): a channel constant in both x and
    dy has x̂ = 0 and dy - mean(dy) = 0, so dx = 0 exactly, in the backward and the primitive."""
    x = make_input(shape, layout, dtype, seed=50, mean=3.0)
    dy = make_input(shape, layout, dtype, seed=51)
    x[:, 1], dy[:, 1] = 0.7, 0.1  # constants of a whole mantissa: their float32 sums are not exact
    x[:, 2], dy[:, 2] = -41.53, 96.123456789
    w = torch.linspace(0.5, 2.0, shape[1])
    y, stats, invstd = TRITON.forward_train(x, w, None, 1e-5)
    dx, _, _ = TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True, batch_mean=batch_mean)
    sum_dy, sum_dy_xhat = TRITON.grad_sums(dy, x, stats.mean, invstd, batch_mean)
    dx_primitive = TRITON.grad_input(dy, x, stats.mean, invstd, w, sum_dy, sum_dy_xhat, stats.count)
    for what, t in (("backward", dx), ("grad_input", dx_primitive)):
        assert float(t[:, 1:3].double().abs().max()) == 0.0, f"{what}: dx of the constant channels is not 0"
    expected_dx = ref.backward(np64(dy), ref.forward_train(np64(x), np64(w), None)[1])[0]
    assert_close(dx, expected_dx, TOL[dtype], "dx of the other channels")


@pytest.mark.parametrize("shape,layout", [((40, 3), "nchw"), ((6, 3, 4, 5), "nchw"), ((6, 4, 4, 5), "cl"),
                                          ((33, 5, 7), "nchw")])  # fmt: skip
def test_training_sums_keep_their_digits_where_dy_has_a_large_common_part(shape, layout):
    """batch_mean=True sums Σ(dy - g)·x̂ (triton_grad's CENTRED; docs/math.md §4.2): with dy = 8 +
    0.01·noise its error stays at float32 rounding of the centred terms, where dy·(x - hi) lost
    about 8 bits. The oracle: the float64 sum over the exact batch mean; and dx through the whole
    backward against the float64 reference."""
    x = make_input(shape, layout, torch.float32, seed=60)
    dy = (8 + 0.01 * make_input(shape, layout, torch.float64, seed=61)).float()
    w = torch.linspace(0.5, 2.0, shape[1])
    _, stats, invstd = TRITON.forward_train(x, w, None, 1e-5)
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x.double() - x.double().mean(dims, keepdim=True)) * invstd.view(view)
    exact = (dy.double() * x_hat).sum(dims)
    scale = ((dy.double() - dy.double().mean(dims, keepdim=True)) * x_hat).square().sum(dims).sqrt()
    errors = {bm: float(((TRITON.grad_sums(dy, x, stats.mean, invstd, bm)[1] - exact).abs() / scale).max())
              for bm in (True, False)}  # fmt: skip
    assert errors[True] < 2e-6 and errors[True] * 20 < errors[False], errors
    dx, _, _ = TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True, batch_mean=True)
    expected_dx = torch.as_tensor(ref.backward(np64(dy), ref.forward_train(np64(x), np64(w), None)[1])[0])
    assert float((dx.double() - expected_dx).abs().max() / expected_dx.abs().max()) < 3e-7


@pytest.mark.parametrize("shape,layout", [((24, 3, 6, 6), "nchw"), ((24, 3, 6, 6), "cl"), ((600, 3), "nchw")])
def test_infinite_dy_gives_the_references_infinities(shape, layout):
    """An infinite dy: Σdy·x̂ ±inf and dx NaN/±inf where the float64 reference has them, not NaN
    everywhere (the float64 remainders, mean_lo·Σ and dy's mean's, are dropped where not finite:
    triton_reduce.finite_or_zero; tests/test_nonfinite_gradient.py for the CPU backends)."""
    x = make_input(shape, layout, torch.float32, seed=68)
    dy = make_input(shape, layout, torch.float32, seed=69)
    rest = (0,) * (len(shape) - 2)
    dy[(3, 0) + rest], dy[(5, 1) + rest], dy[(7, 2) + rest] = float("inf"), float("inf"), -float("inf")
    w = torch.tensor([0.5, 1.5, -2.0])
    _, stats, invstd = TRITON.forward_train(x, w, None, 1e-5)
    dx, dw, db = TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True, batch_mean=True)
    with np.errstate(invalid="ignore"):
        expected = ref.backward(np64(dy), ref.forward_train(np64(x), np64(w), None)[1])
    assert np.isinf(expected[1]).all()
    for got, want in zip((dx, dw, db), expected):
        got = got.double().numpy()
        for kind in (np.isnan, np.isposinf, np.isneginf):
            assert np.array_equal(kind(got), kind(want)), kind.__name__
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=2e-4, atol=2e-4)


def _placed_as_reference(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    """NaN, +inf and -inf where the reference has them, the finite values close."""
    got = got.double().numpy()
    for kind in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(kind(got), kind(want)), f"{what}: {kind.__name__}"
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=2e-4, atol=2e-4, err_msg=what)


@pytest.mark.parametrize("infinity_at", [None, "mean"], ids=["below", "at_the_mean"])
@pytest.mark.parametrize("path", ["nchw", "nchw, merge apart", "cl", "sync"])
def test_infinite_dy_where_x_is_the_rounded_mean(path, infinity_at, monkeypatch):
    """Where x equals the float32-rounded mean hi, x - hi is 0, and a·0 with the infinite coefficient
    a was NaN, where the exact x - mean = -mean_lo gives the float64 reference's -inf (150 values of
    channel 0 here): every dx kernel now takes -lo there (triton_reduce.rounded_mean_term), as the
    CPU kernels do (test_nonfinite_gradient.py). Paths: NCL rows with the merge in the input
    gradient's tiles and apart from them (grad_merge_kernel), channels-last rows (the one-program
    kernel or the general ones, by the autouse fixture), and the input gradient from given sums
    (grad_input_with, SyncBatchNorm's). With the infinite dy itself where x = hi ("at_the_mean"),
    the sums' products (dz - g)·(x - hi) added inf·0 = NaN to Σdy·x̂, where the reference has -inf,
    and dx was NaN across the channel: the partial sums now take -lo there (centred_exactly)."""
    from bnlab.backends import triton_ops
    from speed_helpers import at_the_rounded_mean

    x, dy = at_the_rounded_mean(infinity_at=infinity_at)
    if path == "cl":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    if path == "nchw, merge apart":
        monkeypatch.setattr(triton_ops, "merge_in_tiles", lambda p: False)
    w = torch.tensor([0.5, 1.5, -2.0])
    _, stats, invstd = TRITON.forward_train(x, w, None, 1e-5)
    if path == "sync":
        sum_dy, sum_dy_xhat = TRITON.grad_sums(dy, x, stats.mean, invstd)
        dx = TRITON.grad_input(dy, x, stats.mean, invstd, w, sum_dy, sum_dy_xhat, int(stats.count))
    else:
        dx, sum_dy_xhat, _ = TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True, batch_mean=True)
    with np.errstate(invalid="ignore"):
        expected, expected_dw, _ = ref.backward(np64(dy), ref.forward_train(np64(x), np64(w), None)[1])
    at_mean = (x[:, 0] == 1000.0).numpy()
    if infinity_at is None:
        assert at_mean.sum() == 150 and np.isneginf(expected[:, 0][at_mean]).all()  # the case the test is about
    else:
        assert np.isneginf(expected_dw[0])  # Σdy·x̂ (= dweight) is -inf in the reference
        assert torch.isneginf(sum_dy_xhat[0])
    _placed_as_reference(dx, expected, "dx")


@pytest.mark.parametrize("shape,layout", [((24, 3, 6, 6), "nchw"), ((24, 3, 6, 6), "cl"), ((600, 3), "nchw")])
def test_sync_ranks_sum_about_their_own_mean(shape, layout):
    """SyncBatchNorm on the Triton kernels (bnlab.sync_steps.local_grad_sums): ranks holding 5, 0,
    12 and 7 parts in 24 of the batch each sum about their own mean, centred, and move the sum to
    the group's mean; their shares add up to Σdy·x̂ at float32 rounding of the centred terms where
    dy = 8 + 0.01·noise, where whole-dy sums about the group's mean lost about 8 bits."""
    from bnlab.stats import finalize, merge_moments
    from bnlab.sync_steps import local_grad_sums

    x = make_input(shape, layout, torch.float32, seed=66)
    dy = (8 + 0.01 * make_input(shape, layout, torch.float64, seed=67)).float()
    bounds = [0] + [shape[0] * k // 24 for k in (5, 5, 17, 24)]
    parts = [(x[lo:hi], dy[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    local = [TRITON.moments(xr) for xr, _ in parts]
    stats = merge_moments(local)
    _, _, invstd = finalize(stats, 1e-5)
    centred = sum(local_grad_sums(d, xr, own.mean, stats.mean, invstd, TRITON)[1] for (xr, d), own in zip(parts, local))
    whole = sum(TRITON.grad_sums(d, xr, stats.mean, invstd)[1] for xr, d in parts)
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x.double() - x.double().mean(dims, keepdim=True)) * invstd.view(view)
    exact = (dy.double() * x_hat).sum(dims)
    scale = ((dy.double() - dy.double().mean(dims, keepdim=True)) * x_hat).square().sum(dims).sqrt()
    errors = [float(((sums - exact).abs() / scale).max()) for sums in (centred, whole)]
    assert errors[0] < 2e-6 and errors[0] * 20 < errors[1], errors


@pytest.mark.parametrize("shape,layout", [((40, 5), "nchw"), ((6, 5, 4, 5), "nchw"), ((6, 5, 4, 5), "cl"), ((3, 5), "nchw")])
def test_centre_shift_is_the_portable_rule(shape, layout):
    """triton_grad.centre_shift gives the g of bnlab.elementwise.centre_shift (the CPU kernels' rule)
    in both layouts: a constant channel's value, the mean of one with a large common part, 0 for
    zero-mean dy, for per-sample offsets and for non-finite values, over fewer than 16 values too."""
    gen = torch.Generator().manual_seed(65)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    per_sample = torch.randn((shape[0],) + (1,) * (len(shape) - 2), generator=gen, dtype=torch.float64)
    dy[:, 0] = 0.1
    dy[:, 1] = 8 + 0.01 * dy[:, 1]
    dy[:, 3] = per_sample + 0.01 * dy[:, 3]
    dy[::3, 4] = float("inf")
    dy = to_layout(dy.float(), layout)
    n, c, length = shape[0], shape[1], dy[0, 0].numel()
    got = torch.empty(c)
    if layout == "cl" or len(shape) == 2:  # rows of C channels
        _centre_shifts[(1,)](dy, got, c, 1, c, n * length, BLOCK=8)
    else:
        _centre_shifts[(1,)](dy, got, c, length, c * length, n * length, BLOCK=8)
    # the same rule, in float32 where the portable path works in float64: equal but for a last bit
    torch.testing.assert_close(got, elementwise.centre_shift(dy).float(), rtol=2.4e-7, atol=0)
    assert got[0] == torch.tensor(0.1).float() and abs(float(got[1]) - 8) < 0.01 and got[3] == 0


@triton.jit
def _centre_shifts(dy_ptr, out_ptr, C, RUN, STRIDE, TOTAL, BLOCK: tl.constexpr):
    """triton_grad.centre_shift of channels 0..C-1 into out_ptr (test_centre_shift_is_the_portable_rule)."""
    c = tl.arange(0, BLOCK)
    ok = c < C
    tl.store(out_ptr + c, centre_shift(dy_ptr, c.to(tl.int64) * RUN, ok, RUN, STRIDE, TOTAL), mask=ok)


def _views_the_kernels_do_not_take():
    """(name, view): inputs neither contiguous nor channels-last."""
    yield "expanded batch", make_input((1, 4, 3, 5), seed=52).expand(5, 4, 3, 5)
    yield "strided slice", make_input((5, 4, 3, 10), seed=53)[..., ::2]
    yield "permuted", make_input((5, 4, 5, 3), seed=54).transpose(2, 3)
    yield "expanded (N, C)", make_input((1, 7), seed=55).expand(40, 7)


@pytest.mark.parametrize("case", list(_views_the_kernels_do_not_take()), ids=lambda c: c[0])
def test_views_in_other_strides_run_the_kernels_on_a_contiguous_copy(case, monkeypatch):
    """The primitives give the kernels' bits on ``x.contiguous()``, outputs in the strides of
    ``torch.empty_like(x)``, without the portable path (which on CUDA summed such views in float64
    over several passes); a permuted dense view's elementwise passes stay portable (no copies)."""
    from bnlab.backends import triton_backend
    from bnlab.backends.views import dense_permutation

    name, view = case
    copy = view.contiguous()
    dy = make_input(tuple(view.shape), seed=56)
    w, b = torch.rand(view.shape[1]) + 0.5, torch.randn(view.shape[1])
    calls = []
    for method in ("forward_train", "backward", "moments", "grad_sums", "normalize", "grad_input"):
        real = getattr(triton_backend._PORTABLE, method)
        monkeypatch.setattr(triton_backend._PORTABLE, method, lambda *a, _m=method, _r=real: calls.append(_m) or _r(*a))
    promised = torch.empty_like(view).stride()
    y_view, stats, invstd = TRITON.forward_train(view, w, b, 1e-5)
    y_copy, stats_copy, _ = TRITON.forward_train(copy, w, b, 1e-5)
    assert torch.equal(y_view, y_copy) and y_view.stride() == promised
    assert torch.equal(stats.mean, stats_copy.mean) and torch.equal(stats.m2, stats_copy.m2)
    back = [TRITON.backward(dy, x, stats.mean, invstd, w, stats.count, True) for x in (view, copy)]
    assert all(torch.equal(a, e) for a, e in zip(*back)) and back[0][0].stride() == promised
    assert torch.equal(TRITON.moments(view).m2, TRITON.moments(copy).m2)
    sums = [TRITON.grad_sums(dy, x, stats.mean, invstd) for x in (view, copy)]
    assert all(torch.equal(a, e) for a, e in zip(*sums))
    assert calls == [], f"{name}: the portable path ran {calls}"
    normalized = TRITON.normalize(view, stats.mean, invstd, w, b)
    dx = TRITON.grad_input(dy, view, stats.mean, invstd, w, *sums[1], stats.count)
    assert calls == (["normalize", "grad_input"] if dense_permutation(view) else []), (name, calls)
    if not calls:  # (the portable path lays dx out as dy, here contiguous)
        assert normalized.stride() == promised and dx.stride() == promised
    _, cache = ref.forward_train(np64(view), np64(w), np64(b))
    assert_close(normalized, cache.x_hat * np64(w).reshape((1, -1) + (1,) * (view.dim() - 2)) + np64(b).reshape(
        (1, -1) + (1,) * (view.dim() - 2)), 2e-6, "normalize")  # fmt: skip
    assert_close(dx, ref.backward(np64(dy), cache)[0], 2e-4, "grad_input")


@pytest.mark.parametrize("case", list(_views_the_kernels_do_not_take())[:3], ids=lambda c: c[0])
def test_a_module_trains_and_evaluates_on_views_as_torch(triton_everywhere, case):
    """The layer on an expanded, strided or permuted input (the generic autograd path, the
    kernels on a copy) against torch.nn: outputs, input and parameter gradients, running
    statistics, eval; outputs in the strides of ``torch.empty_like(x)``."""
    name, view = case
    dy = make_input(tuple(view.shape), seed=57)
    ours, theirs = bnlab.BatchNorm2d(view.shape[1]), torch.nn.BatchNorm2d(view.shape[1])
    results = [step_and_eval(layer, view, dy) for layer in (ours, theirs)]
    for got, want, what in zip(*results, STEP_AND_EVAL):
        assert_close(got, want, 2e-4, f"{name} {what}")
    assert results[0][0].stride() == torch.empty_like(view).stride()


@pytest.mark.parametrize("where", ["input", "gradient", "negative vectors", "strided vectors"])
def test_odd_tensors_give_the_bits_of_their_resolved_contiguous_values(triton_everywhere, where):
    """Tensors the Triton kernels must not address as they are, which read by pointer: a view with
    torch's negative bit (torch._neg_view, whose memory holds -t) as input, gradient, or parameters
    and running statistics, and parameters and running statistics sliced with a step. They get the
    resolved contiguous copy (TritonBackend.plan, _like, _vector; _all_plain declines the whole
    calls, which write the running statistics in place): the bits of the plain tensors, in
    training (outputs, gradients, running statistics) and eval. (A step-sliced weight was read as
    contiguous by the compositions' kernels before the fortieth session: outputs 2.3 off.)"""
    x, dy = make_input((5, 4, 3, 6), seed=58), make_input((5, 4, 3, 6), seed=59)
    state = [torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), torch.rand(4) + 0.5]
    neg = lambda t: torch._neg_view(-t)  # noqa: E731
    odd = {"negative vectors": neg, "strided vectors": lambda t: torch.stack([t, -t], 1).view(-1)[::2]}.get(where)
    results = []
    for plain in (False, True):
        vector = torch.clone if plain or odd is None else odd
        layer = bnlab.BatchNorm2d(4)
        layer.weight, layer.bias = torch.nn.Parameter(vector(state[0])), torch.nn.Parameter(vector(state[1]))
        layer.running_mean, layer.running_var = vector(state[2]), vector(state[3])
        assert torch.equal(layer.weight, state[0]) and torch.equal(layer.running_var, state[3])
        given = (x if plain or where != "input" else neg(x), dy if plain or where != "gradient" else neg(dy))
        results.append(step_and_eval(layer, *given))
    for got, want, what in zip(*results, STEP_AND_EVAL):
        assert torch.equal(got, want), (where, what, (got - want).abs().max().item())


def _bits(t):
    return None if t is None else (t.dtype, tuple(t.shape), t.stride(), t.detach().contiguous().view(-1).view(torch.uint8).tolist())


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_a_compiled_layer_runs_the_triton_kernels_to_the_eager_bits(triton_everywhere, layout):
    """Under torch.compile the layer's bnlab:: operators (bnlab.custom_ops) choose the backend as an
    eager call does: with Triton's kernels, too, the compiled layer gives the eager bits (outputs,
    gradients, running averages and counter; training steps, then eval with and without a graph)."""
    import copy

    eager = bnlab.BatchNorm2d(3)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5), eager.bias.uniform_(-1, 1)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)

        def step(layer, x, dy):
            x = x.clone().requires_grad_()
            y = layer(x)
            y.backward(dy)
            found = [y, x.grad, *(p.grad for p in layer.parameters()), *layer.buffers()]
            layer.zero_grad(set_to_none=True)
            return [_bits(t) for t in found]

        for k in range(2):
            x = make_input((4, 3, 5, 3), layout, seed=11 + k, mean=k)
            dy = make_input((4, 3, 5, 3), layout, seed=13 + k)
            assert step(compiled, x, dy) == step(eager, x, dy), f"training step {k}"
        eager.eval(), twin.eval()
        assert step(compiled, x, dy) == step(eager, x, dy), "eval with a graph"
        with torch.no_grad():
            assert _bits(compiled(x)) == _bits(eager(x)), "inference"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm2d(3), lambda: bnlab.BatchNormAct2d(3, residual=True)],
                         ids=["BatchNorm2d", "BatchNormAct2d"])  # fmt: skip
def test_buffers_made_under_inference_mode_are_refused_outside_it_unchanged(triton_everywhere, make):
    """The Triton kernels (fused or not) write the running statistics in place; a layer built under
    torch.inference_mode() and trained outside it is refused first, as torch.nn refuses it
    (tests/test_inference_tensors.py for the CPU routes), and inside the mode it trains."""
    with torch.inference_mode():
        layer = make()
    x = make_input((4, 3, 5, 3), "cl", seed=11)
    call = (lambda: layer(x, torch.zeros_like(x))) if isinstance(layer, bnlab.BatchNormAct2d) else (lambda: layer(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    refused = "^Inplace update to inference tensor outside InferenceMode"
    with torch.no_grad(), pytest.raises(RuntimeError, match=refused):
        call()
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with torch.inference_mode():
        y = call()
    assert int(layer.num_batches_tracked) == 1 and torch.isfinite(y).all()
    mean = x.double().mean((0, 2, 3))
    assert_close(layer.running_mean, 0.1 * mean, 2e-4, "running mean")
