"""The compiled CPU backend against the float64 reference, torch.nn and the portable backend.

Shapes are chosen to reach every code path of cpu_kernels.cpp: the NCL layout with short rows
(several rows per chunk), with long rows (rows cut in segments), per-channel tasks and
channel x batch waves (fewer than 4 channels per thread, two threads), the NLC layout (2D
inputs, channels_last, transposed 3D), channels outermost (run as NCL), and inputs of other strides (run on a
contiguous copy).
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.backends import cpu_build, get_backend
from speed_helpers import (
    STEP_AND_EVAL,
    TOL,
    assert_bf16_is_scaled_as_torch,
    assert_close,
    bf16_special_values,
    make_input,
    np64,
    step_and_eval,
    to_layout,
)

CPU = get_backend("cpu")
PORTABLE = get_backend("portable")

# (shape, layout): NCL short rows, NCL long rows (L >= 2048 is cut in segments), 2 threads with
# waves (C < 8) and with per-channel tasks, NLC: 2D, channels_last 4D/5D, transposed 3D; primes;
# channels outermost (cf: a transposed (C, N) activation, as the lab's stacked MLPs feed BN), one
# and two threads.
CASES = [
    ((7, 5), "nchw"),
    ((13, 3, 11), "nchw"),
    ((3, 4, 2053), "nchw"),
    ((64, 3, 19, 23), "nchw"),
    ((4, 2, 4099), "nchw"),
    ((2, 11, 1601, 2), "nchw"),
    ((5, 6, 7, 9), "cl"),
    ((37, 5, 3, 4, 5), "cl"),
    ((9, 17, 13), "cl"),
    ((300, 130), "nchw"),
    ((300, 130), "cf"),
    ((6, 5, 7, 3), "cf"),
    ((100, 700), "cf"),
    # NLC channel widths of the AVX2 paths: narrow rows held in registers (8, 16, 24, 32 channels),
    # groups of 32 and 8 channels with a scalar remainder (40, 100); bf16 rows of a multiple of 16
    # channels in unpacked order (48, 1024).
    ((65, 8), "nchw"),
    ((50, 16, 3, 3), "cl"),
    ((9, 24, 13), "cl"),
    ((19, 32, 2, 3), "cl"),
    ((33, 40), "nchw"),
    ((70, 100), "nchw"),
    ((12, 48, 2, 2), "cl"),
    ((6, 1024), "nchw"),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_kernels_are_built_and_preferred_on_cpu():
    assert cpu_build.load() is not None, f"the CPU kernels did not build: {cpu_build.load_error()}"
    assert bnlab.available_backends()[0] == "cpu"
    for dtype in DTYPES:
        assert CPU.supports(torch.zeros(2, 3, dtype=dtype))
    assert not CPU.supports(torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward_match_reference(shape, layout, dtype):
    channels = shape[1]
    x = make_input(shape, layout, dtype, seed=1, mean=0.5, std=2.0)
    dy = make_input(shape, layout, dtype, seed=2)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(channels, dtype=param_dtype) + 0.5
    b = torch.randn(channels, dtype=param_dtype)
    y, stats, invstd = CPU.forward_train(x, w, b, 1e-5)
    dx, dw, db = CPU.backward(dy, x, stats.mean, invstd, w, stats.count, True)
    expected_y, cache = ref.forward_train(np64(x), np64(w), np64(b), eps=1e-5)
    expected_dx, expected_dw, expected_db = ref.backward(np64(dy), cache)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert_close(y, expected_y, tol, "y")
    assert_close(dx, expected_dx, tol, "dx")
    # Statistics: float64 accumulation for float32/64, float32 within ~2048-value chunks for 16-bit types.
    stats_tol = {torch.float64: 1e-9, torch.float32: 1e-6}.get(dtype, 1e-5)
    assert_close(stats.mean, cache.mean, stats_tol, "mean")
    assert_close(stats.m2 / stats.count, cache.var, stats_tol, "variance")
    scale = max(1.0, float(cache.x_hat.size // channels))  # the sums grow with the values per channel
    assert_close(dw / scale, expected_dw / scale, tol, "dweight")
    assert_close(db / scale, expected_db / scale, tol, "dbias")


@pytest.mark.parametrize("shape,layout", CASES[:6] + CASES[6:8])
def test_primitives_match_portable_backend(shape, layout):
    """The four primitives (SyncBatchNorm composes them) agree with the portable backend."""
    x = make_input(shape, layout, torch.float64, seed=3, mean=-1.0, std=3.0)
    dy = make_input(shape, layout, torch.float64, seed=4)
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    m_cpu, m_ref = CPU.moments(x), PORTABLE.moments(x)
    assert m_cpu.count == m_ref.count
    assert_close(m_cpu.mean, m_ref.mean, 1e-12, "mean")
    assert_close(m_cpu.m2 / m_ref.count, m_ref.m2 / m_ref.count, 1e-12, "M2")
    invstd = torch.rsqrt(m_ref.m2 / m_ref.count + 1e-5)
    assert_close(CPU.normalize(x, m_ref.mean, invstd, w, b), PORTABLE.normalize(x, m_ref.mean, invstd, w, b), 1e-12, "normalize")
    s_cpu, s_ref = CPU.grad_sums(dy, x, m_ref.mean, invstd), PORTABLE.grad_sums(dy, x, m_ref.mean, invstd)
    for a, e, name in zip(s_cpu, s_ref, ("sum dy", "sum dy*xhat")):
        assert_close(a / x.numel(), e / x.numel(), 1e-12, name)
    gi = CPU.grad_input(dy, x, m_ref.mean, invstd, w, s_ref[0], s_ref[1], m_ref.count)
    assert_close(gi, PORTABLE.grad_input(dy, x, m_ref.mean, invstd, w, s_ref[0], s_ref[1], m_ref.count), 1e-12, "grad_input")


@pytest.mark.parametrize("layout", ["nchw", "cl", "cf", "strided"])
@pytest.mark.parametrize("config", [
    dict(momentum=0.1), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(bias=False),
])  # fmt: skip
def test_module_matches_torch_over_train_and_eval_steps(layout, config):
    """bnlab.BatchNorm2d (fast path, CPU kernels) against torch.nn.BatchNorm2d, step by step."""
    torch.manual_seed(0)
    ours, theirs = bnlab.BatchNorm2d(6, **config), torch.nn.BatchNorm2d(6, **config)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    for step, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = make_input((8, 6, 5, 7), layout, seed=10 + step, mean=step, std=1 + step)
        dy = make_input((8, 6, 5, 7), layout, seed=20 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert_close(y1, y2, 2e-4, f"step {step} output")
        y1.backward(dy)
        y2.backward(dy)
        assert_close(x1.grad, x2.grad, 2e-4, f"step {step} grad x")
        for name in ("weight", "bias"):
            if getattr(ours, name) is not None:
                assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, 2e-4, f"step {step} grad {name}")
                getattr(ours, name).grad = getattr(theirs, name).grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(theirs, name) is not None:
                assert_close(getattr(ours, name), getattr(theirs, name), 2e-4, f"step {step} {name}")


def test_eval_without_grad_uses_running_buffers_and_rejects_negative_variance():
    layer = bnlab.BatchNorm1d(4).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
        x = make_input((16, 4), seed=5)
        expected = ref.forward_eval(np64(x), np64(layer.running_mean), np64(layer.running_var))
        assert_close(layer(x), expected, 2e-4, "eval output")
        layer.running_var[2] = -1.0
        with pytest.raises(ValueError, match="running_var"):
            layer(x)


@pytest.mark.parametrize("shape", [(4, 600), (3, 600, 2, 2), (2, 600, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_layers_match_torch_across_channel_blocks(shape, dtype):
    """Many channels, few values each: the per-channel work in blocks of 256 (cpu_kernels_coef.inc).

    600 channels span two whole blocks and a partial one: every channel's output, gradients and
    running averages against torch.nn, over training steps and eval; and a negative running
    variance past the first block is still found.
    """
    torch.manual_seed(3)
    channels = shape[1]
    kind = bnlab.BatchNorm1d if len(shape) == 2 else bnlab.BatchNorm2d
    ours = kind(channels)
    theirs = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    for step, mode in enumerate(["train", "train", "eval"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(shape) * (1 + step) + step).to(dtype)
        dy = torch.randn(shape).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert_close(y1.float(), y2.float(), tol, f"step {step} output")
        y1.backward(dy)
        y2.backward(dy)
        assert_close(x1.grad.float(), x2.grad.float(), tol, f"step {step} grad x")
        for name in ("weight", "bias"):
            assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, tol * 10, f"step {step} grad {name}")
            getattr(ours, name).grad = getattr(theirs, name).grad = None
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(theirs, name), 2e-4, f"step {step} {name}")
    with torch.no_grad():
        ours.running_var[channels // 2] = -1.0
        with pytest.raises(ValueError, match="running_var"):
            ours(x)


@pytest.mark.parametrize("shape,layout", [((24, 64, 32, 32), "cl"), ((15000, 100), "nchw")])
def test_channels_last_rows_beyond_the_l2_match_torch(shape, layout):
    """6 MB of NLC rows: each thread's share exceeds a 2 MiB L2 and the outputs stay under the
    streaming bounds (dx's two thirds of it: on last-level caches above 18 MiB), so on Intel CPUs
    with AVX-512 the elementwise passes walk the share in blocks from the last reduced row back to
    the first (row_blocks_last_first; elsewhere in memory order, and test_backend_cpu_walks.py
    takes the walk back on any machine); every row must still be written, forward and backward,
    on two threads."""
    torch.manual_seed(4)
    x = to_layout(torch.randn(shape) * 2 + 1, layout)
    dy = to_layout(torch.randn(shape), layout)
    channels = shape[1]
    kind = bnlab.BatchNorm1d if len(shape) == 2 else bnlab.BatchNorm2d
    ours, theirs = kind(channels), (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        y1.backward(dy)
        y2.backward(dy)
    finally:
        torch.set_num_threads(threads)
    assert_close(y1, y2, 2e-4, "output")
    assert_close(x1.grad, x2.grad, 2e-4, "grad x")


@pytest.mark.parametrize("channels", [8, 16, 24, 32, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_of_channels_last_rows_matches_torch(channels, dtype):
    """Eval on rows of C contiguous channels (the NLC kernels' widths: narrow rows held in
    registers, channel groups, a scalar remainder), 4D channels_last and 2D, against torch.nn."""
    torch.manual_seed(channels)
    ours, theirs = bnlab.BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = make_input((7, channels, 3, 5), "cl", dtype, seed=channels, mean=1.0, std=2.0)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), TOL[dtype], "eval, channels_last")
        flat = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (N·H·W, C) rows
        ours1d, theirs1d = bnlab.BatchNorm1d(channels).eval(), torch.nn.BatchNorm1d(channels).eval()
        ours1d.load_state_dict(ours.state_dict()), theirs1d.load_state_dict(ours.state_dict())
        assert_close(ours1d(flat), theirs1d(flat), TOL[dtype], "eval, (N, C)")


def test_gradient_may_arrive_in_another_memory_format():
    x = make_input((4, 6, 5, 5), "cl", seed=6).requires_grad_()
    dy = make_input((4, 6, 5, 5), "nchw", seed=7)
    layer = bnlab.BatchNorm2d(6)
    layer(x).backward(dy)
    _, cache = ref.forward_train(np64(x))
    assert_close(x.grad, ref.backward(np64(dy), cache)[0], 2e-4, "grad x with an NCHW gradient of a channels_last input")


def _views_the_kernels_do_not_take():
    """(name, view, its base or None): inputs in none of the kernels' layouts."""
    base = make_input((1, 6, 5, 7), seed=20)
    wide = make_input((4, 6, 5, 14), seed=21)
    yield "expanded batch", base.expand(4, 6, 5, 7), base
    yield "strided slice", wide[..., ::2], None
    yield "permuted", make_input((4, 6, 7, 5), seed=22).transpose(2, 3), None
    yield "expanded (N, C)", make_input((1, 9), seed=23).expand(300, 9), None


@pytest.mark.parametrize("case", list(_views_the_kernels_do_not_take()), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_in_other_strides_run_the_kernels_on_a_contiguous_copy(case, dtype):
    """An expanded, strided or permuted input gives the kernels' bits on ``x.contiguous()``, in
    training (outputs, gradients, running statistics) and eval (a permuted view's eval runs on the
    view itself, elementwise, to the same bits), its outputs in the strides of
    ``torch.empty_like(x)`` (as the portable path gave them, and bnlab's compiled operators promise),
    and its gradient reaches the tensor it was expanded from."""
    name, view, base = case
    view = view.to(dtype)
    dy = make_input(tuple(view.shape), seed=24).to(dtype)
    layer_class = getattr(bnlab, "BatchNorm2d" if view.dim() == 4 else "BatchNorm1d")
    results = [step_and_eval(layer_class(view.shape[1]), x, dy) for x in (view, view.contiguous())]
    for got, want, what in zip(*results, STEP_AND_EVAL):
        assert torch.equal(got, want), (name, what)
    promised = torch.empty_like(view).stride()
    assert results[0][0].stride() == promised and results[0][-1].stride() == promised
    if base is not None:  # through the expand: the batch's gradients summed into the base
        b = base.to(dtype).detach().requires_grad_()
        layer = bnlab.BatchNorm2d(view.shape[1])
        (db,) = torch.autograd.grad(layer(b.expand_as(view)), [b], dy)
        # the batch's sum of dx, up to the rounding of that sum in the input's dtype
        assert_close(db, results[0][1].double().sum(0, keepdim=True), TOL[dtype] * view.shape[0], "base gradient")


def test_dense_permutation_tells_permuted_tensors_from_gapped_and_expanded_ones():
    from bnlab.backends.cpu_layout import dense_permutation

    base = torch.randn(4, 6, 5, 7)
    assert dense_permutation(base) and dense_permutation(base.permute(2, 0, 3, 1))
    assert dense_permutation(base[:1].transpose(0, 3))  # size-1 dims are free
    assert not dense_permutation(base[..., ::2]) and not dense_permutation(base[:, 1:])
    assert not dense_permutation(base[:1].expand(4, 6, 5, 7))


def test_primitives_on_a_view_equal_the_primitives_on_its_copy():
    """SyncBatchNorm's primitives take views in other strides the same way (bits of the copy)."""
    view = make_input((5, 4, 3, 12), seed=25)[..., ::3]
    copy = view.contiguous()
    dy = make_input(tuple(view.shape), seed=26)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    m_view, m_copy = CPU.moments(view), CPU.moments(copy)
    assert torch.equal(m_view.mean, m_copy.mean) and torch.equal(m_view.m2, m_copy.m2)
    invstd = torch.rsqrt(m_copy.m2 / m_copy.count + 1e-5)
    assert torch.equal(CPU.normalize(view, m_copy.mean, invstd, w, b), CPU.normalize(copy, m_copy.mean, invstd, w, b))
    sums_view, sums_copy = CPU.grad_sums(dy, view, m_copy.mean, invstd), CPU.grad_sums(dy, copy, m_copy.mean, invstd)
    assert all(torch.equal(a, e) for a, e in zip(sums_view, sums_copy))
    gi = [CPU.grad_input(dy, x, m_copy.mean, invstd, w, *sums_copy, m_copy.count) for x in (view, copy)]
    assert torch.equal(gi[0], gi[1])
    train = [CPU.forward_train(x, w, b, 1e-5) for x in (view, copy)]
    assert torch.equal(train[0][0], train[1][0]) and train[0][0].stride() == torch.empty_like(view).stride()
    back = [CPU.backward(dy, x, m_copy.mean, invstd, w, m_copy.count, True) for x in (view, copy)]
    assert all(torch.equal(a, e) for a, e in zip(back[0], back[1]))


def test_double_backward_through_the_fused_training_op():
    x = make_input((6, 3, 4), dtype=torch.float64, seed=8).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return CPU.train_forward(x, w, b, 1e-5, None, None, 0.1)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_results_do_not_depend_on_the_thread_count():
    x = make_input((16, 24, 40, 40), seed=9)  # 24 channels: per-channel tasks with 1 or 2 threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CPU.forward_train(x, None, None, 1e-5)
        torch.set_num_threads(2)
        two = CPU.forward_train(x, None, None, 1e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1].m2, two[1].m2)


def test_disabled_kernels_fall_back_to_portable(tmp_path):
    import subprocess
    import sys

    code = "import bnlab, torch; from bnlab.backends import select_backend; print(select_backend(torch.zeros(2, 3)).name)"
    env = {**__import__("os").environ, "BNLAB_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_update_skips_a_non_finite_batch(momentum):
    """The non-finite guard of bnlab's layers (bnlab.stats.update_running_stats_): a batch with a NaN
    in one channel leaves every running average and num_batches_tracked as they were, and
    momentum=None keeps weighting the k-th finite batch by 1/k."""
    layer = bnlab.BatchNorm2d(3, momentum=momentum)
    good = [make_input((4, 3, 5, 5), seed=s, mean=s) for s in (30, 31)]
    bad = make_input((4, 3, 5, 5), seed=32)
    bad[1, 2, 3, 3] = float("nan")
    layer(good[0])
    before = (layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked))
    y = layer(bad)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == before[2] == 1
    layer(good[1])
    factor = 0.1 if momentum is not None else 1 / 2
    stats = ref.moments(np64(good[1]))
    expected = (1 - factor) * np64(before[0]) + factor * stats.mean
    assert_close(layer.running_mean, expected, 1e-6, "running_mean after the skipped batch")
    assert int(layer.num_batches_tracked) == 2


# bf16 shapes reaching every vectorised store that does not stream (the streamed ones:
# test_backend_cpu_streaming.py): NCL rows of 16+ values and shorter ones, NLC rows of narrow
# widths (16, 24), of other widths from 16 (35, 40, 100) and of multiples of 16 (48, 64).
BF16_STORE_SHAPES = [
    ((4, 3, 37), "nchw"), ((2, 5, 9), "nchw"), ((6, 40, 3), "cl"), ((7, 35), "nchw"), ((6, 16, 3), "cl"), ((5, 24), "nchw"),
    ((4, 48, 5), "cl"), ((3, 64, 2, 2), "cl"), ((9, 100), "nchw"), ((3, 5, 40), "nchw"),
    # bf16 pairs of vectors rounded in one conversion (st32): NCL rows of whole vectors, row by row
    # (48 values: single vectors; 64 and 80: pairs from the row's first 64-byte line), channels-last
    # rows of 80 and 264 channels (rows starting 16 to 48 bytes into a line: one or two vectors
    # before the first pair), of 32 channels (a pair each) and of 16 two at a time (15 rows: the
    # last one alone)
    ((2, 3, 64), "nchw"), ((3, 4, 48), "nchw"), ((3, 5, 80), "nchw"), ((5, 32, 3), "cl"), ((4, 80, 3), "cl"),
    ((3, 264, 2), "cl"), ((5, 16, 3), "cl"),
    # NCL rows of many pairs in the even/odd form (AVX512-BF16 builds: eo_split, st32_eo), whose loads
    # run two pairs ahead: 8 pairs a row (256 values), rows of 144 starting at 0 or 32 bytes into a
    # line (4 pairs after 0 or 16 values), rows of 96 (3 pairs: the loads ahead stop at the row's end)
    ((2, 3, 256), "nchw"), ((3, 2, 144), "nchw"), ((3, 3, 96), "nchw"),
    # the input gradient's even/odd pairs in the lines walk (rows not a multiple of 16 values): rows
    # of 196 (14x14 maps) and of 150 values, several pairs each between the rows' ends
    ((2, 3, 196), "nchw"), ((3, 2, 150), "nchw"),
    # AVX2 builds' bf16 blocks in even/odd order (ld16_eo, st16_eo): rows of 8 channels two at a time
    # (15 rows: the last one alone), of 24 (blocks of 48 values) and of 100 (blocks of 4 rows, 9 rows)
    ((6, 8), "nchw"), ((5, 8, 3), "cl"), ((7, 24), "nchw"),
]  # fmt: skip


@pytest.mark.parametrize("shape,layout", BF16_STORE_SHAPES)
@pytest.mark.parametrize("kernel", ["normalize", "grad_input"])
def test_bfloat16_outputs_round_as_torch(shape, layout, kernel):
    """The vectorised bf16 stores round exactly as torch's float32 -> bfloat16 conversion,
    subnormals, infinities, NaN and overflow included. With mean 0 and invstd 1 + 2^-10 the
    float32 result x·(1 + 2^-10) is exact; the input gradient with zero sums, dy·(1 + 2^-10),
    likewise. (Those products are never halfway between two bf16 values: the test below makes
    the ties.)"""
    x = to_layout(bf16_special_values(shape, seed=11), layout)
    scale = 1.0 + 2.0**-10
    mean, invstd = torch.zeros(shape[1], dtype=torch.float64), torch.full((shape[1],), scale, dtype=torch.float64)
    if kernel == "normalize":
        y = CPU.normalize(x, mean, invstd, None, None)
    else:  # x is the gradient here; the input is finite, so a·(x - hi) = 0 exactly
        zeros = torch.zeros(shape[1], dtype=torch.float64)
        y = CPU.grad_input(x, torch.ones_like(x), mean, invstd, None, zeros, zeros, x.numel() // shape[1])
    assert_bf16_is_scaled_as_torch(y, x, scale)


# (significand bits, smallest normal exponent, largest exponent used) of the 16-bit types
HALF_FORMATS = {torch.bfloat16: (8, -126, 120), torch.float16: (11, -14, 14)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", BF16_STORE_SHAPES)
@pytest.mark.parametrize("kernel", ["normalize", "grad_input"])
def test_16bit_ties_round_to_even_as_torch(shape, layout, kernel, dtype):
    """Every result exactly halfway between two bf16 (float16) values, rounded to the even one as
    torch does.

    With p significand bits (8 for bf16, 11 for float16), channel c holds values of one binade,
    ±m·2^(e_c - p + 1) with m in [2^(p-1) + 1, 2^p) (one channel subnormal: m < 2^(p-1) at the
    smallest normal exponent), and the result adds half their ulp, 2^(e_c - p): y = x + 2^(e_c - p)
    through the shift of normalize (mean 0, invstd 1, bias the half ulp) or dx = dy + 2^(e_c - p)
    through the input gradient's constant (Σdy = -count·half ulp). Both are exact in float32, and
    half the values then round up, half down, by the parity of m.
    """
    bits, e_min, e_max = HALF_FORMATS[dtype]
    gen = torch.Generator().manual_seed(5)
    c = shape[1]
    exponents = torch.linspace(e_min + 6, e_max, c).round().to(torch.int64)
    exponents[0] = e_min  # the subnormal binade: m·2^(e_min - p + 1) for m < 2^(p-1)
    shape_c_last = (*shape[:1], *shape[2:], c)  # channel as the last dimension, moved into place below
    top = 2 ** (bits - 1)
    m = torch.randint(1, 2 * top, shape_c_last, generator=gen).to(torch.float64)
    m[..., 1:] = m[..., 1:] % (top - 1) + top + 1  # normal binades: x ± half an ulp stays in the binade
    m[..., 0] = m[..., 0] % (top - 1) + 1  # the subnormal binade
    sign = torch.randint(0, 2, shape_c_last, generator=gen).to(torch.float64) * 2 - 1
    values = (sign * m * torch.exp2((exponents - bits + 1).to(torch.float64))).movedim(-1, 1).contiguous()
    x = to_layout(values.to(dtype), layout)
    assert torch.equal(x.double(), to_layout(values, layout))  # exact in the 16-bit type
    half_ulp = torch.exp2((exponents - bits).to(torch.float64))
    zeros, ones = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    count = x.numel() // c
    if kernel == "normalize":
        y = CPU.normalize(x, zeros, ones, None, half_ulp.float())
    else:  # dx = kk·dy + a·(x - hi) + cc with kk = 1, a = 0, cc = -Σdy/count = the half ulp
        y = CPU.grad_input(x, torch.ones_like(x), zeros, ones, None, -half_ulp * count, zeros, count)
    exact = x.float() + half_ulp.float().view(1, c, *([1] * (len(shape) - 2)))
    assert torch.equal(exact.double() - x.double(), half_ulp.view(1, c, *([1] * (len(shape) - 2))).expand_as(exact))
    expected = exact.to(dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))
    rounded_up = expected.float().abs() > x.float().abs()
    assert 0 < int(rounded_up.sum()) < x.numel()  # both directions occur
