"""Which Triton kernels an input takes, and that the paths agree: the one-kernel eval, the backward
that merges its sums in the input gradient's tiles, the plan lookup (docs/benchmarks.md, GPU
section, seventh session). Run by Triton's interpreter on CPU tensors, as tests/test_triton.py.

Each path is checked bit for bit against the path it replaces (forced by monkeypatching the
choice), and against the float64 reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined (see test_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from bnlab import reference as ref  # noqa: E402
from bnlab.backends import triton_ops, triton_plan  # noqa: E402
from speed_helpers import assert_close, make_input, np64, to_layout  # noqa: E402


_WIDE_TILES = (128, 4, 1024, 4, 64)  # interpreter tiles of 1024 values: NLC tiles of 8 channels qualify too


@pytest.mark.parametrize("shape,layout,tiles", [((5, 3, 7, 6), "nchw", None), ((2, 4, 70), "nchw", None),
                                                ((30, 6), "nchw", _WIDE_TILES), ((4, 6, 3, 5), "cl", _WIDE_TILES)])
@pytest.mark.parametrize("variant", ["running statistics", "residual and relu", "given invstd"])
def test_eval_in_one_launch_computes_the_bits_of_two(shape, layout, tiles, variant, monkeypatch):
    """eval_kernel computes each tile's coefficients itself: bit for bit what eval_coef_kernel and
    normalize_kernel compute in two launches, and the float64 reference's values."""
    monkeypatch.setattr(triton_ops, "SMALL_NUMEL", 0)  # NLC inputs would take the one-program kernels
    if tiles is not None:
        monkeypatch.setattr(triton_plan, "_INTERPRETER_TILES", triton_plan.Tiles(*tiles))
    c = shape[1]
    x = make_input(shape, layout, seed=51, mean=0.3, std=2.0)
    res = make_input(shape, layout, seed=52) if variant == "residual and relu" else None
    g = torch.Generator().manual_seed(53)
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    invstd = 1.0 / torch.sqrt(var.double() + 1e-5)

    def evaluate():
        if variant == "given invstd":
            return triton_ops.normalize_with(x, mean.double(), invstd, w, b)
        y, ok = triton_ops.normalize_with(x, mean, var, w, b, 1e-5, given_invstd=False, residual=res,
                                          relu=res is not None)  # fmt: skip
        assert int(ok) == 1
        return y

    assert triton_ops.eval_one_launch(triton_ops.plan(x))
    one = evaluate()
    monkeypatch.setattr(triton_ops, "eval_one_launch", lambda p: False)
    two = evaluate()
    assert torch.equal(one, two) and one.stride() == x.stride()
    shape_c = [1, c] + [1] * (x.dim() - 2)
    expected = (x.double() - mean.double().view(shape_c)) * (invstd * w.double()).view(shape_c) + b.double().view(shape_c)
    if res is not None:
        expected = torch.relu(expected + res.double())
    assert_close(one, expected, 2e-6, "eval output")


@pytest.mark.parametrize("shape", [(5, 3, 7, 6), (6, 2, 40), (4, 3, 3, 3), (11, 1, 13)])
@pytest.mark.parametrize("variant", ["plain", "fused with residual", "residual gradient only"])
def test_backward_merging_in_tiles_computes_the_merge_kernels_bits(shape, variant, monkeypatch):
    """grad_input_merged_kernel (each NCL tile merges its rows' partial sums; sample 0's tiles in
    the first column write sums, dweight and dbias): the same bits as grad_merge_kernel followed
    by grad_input_kernel. The shapes give 1-4 segments per channel, and tiles of 2 to 8 rows, more
    rows than channels among them."""
    c = shape[1]
    x = make_input(shape, seed=61, mean=0.5, std=2.0)
    dy, res = make_input(shape, seed=62), make_input(shape, seed=63)
    w = torch.rand(c, generator=torch.Generator().manual_seed(64)) + 0.5
    p = triton_ops.plan(x)
    assert triton_ops.merge_in_tiles(p)
    fused = variant != "plain"
    _, stats, coef, mask = triton_ops.forward_train(x, w, torch.zeros(c), 1e-5, residual=res if fused else None,
                                                    relu=fused, want_mask=fused)  # fmt: skip

    def backward():
        dw, db = torch.full((c,), float("nan")), torch.full((c,), float("nan"), dtype=torch.bfloat16)
        need_dx = variant != "residual gradient only"
        dx, sums, dres = triton_ops.backward(dy, x, stats, coef[0], w, need_dx, mask=mask, want_dres=fused, dweight=dw,
                                             dbias=db)  # fmt: skip
        return [t for t in (dx, sums, dres, dw, db) if t is not None]

    merged = backward()
    monkeypatch.setattr(triton_ops, "merge_in_tiles", lambda p: False)
    separate = backward()
    assert len(merged) == len(separate)
    for got, want in zip(merged, separate):
        assert torch.equal(got, want), (got, want)
    assert not torch.isnan(merged[-2]).any() and not torch.isnan(merged[-1]).any(), "every channel's sums written"


def test_plans_are_looked_up_by_shape_strides_and_tiles(monkeypatch):
    """plan() remembers its plans: the same one for the same shape, strides, tiles and program
    count; a new one when any differs; and it keeps a bounded number."""
    monkeypatch.setattr(triton_plan, "_PLANS", {})
    x = torch.empty(6, 5, 4, 3)
    first = triton_ops.plan(x)
    assert triton_ops.plan(torch.empty(6, 5, 4, 3)) is first
    assert triton_ops.plan(to_layout(x, "cl")) == triton_plan._new_plan(to_layout(x, "cl"), triton_plan._INTERPRETER_TILES, 4)
    assert not triton_ops.plan(to_layout(x, "cl")).ncl and first.ncl
    assert triton_ops.plan(x, for_gpu=True) == triton_plan._new_plan(x, triton_plan.GPU_TILES, 4 * 132)
    assert triton_ops.plan(x[:, :, ::2]) is None  # neither layout: the portable path
    monkeypatch.setattr(triton_plan, "_INTERPRETER_TILES", triton_plan.Tiles(256, 4, 256, 4, 64))
    assert triton_ops.plan(x) != first and triton_ops.plan(x).block_r == 256 // first.block_k
    monkeypatch.setattr(triton_plan, "_PLANS_KEPT", 3)
    for n in range(1, 8):
        triton_ops.plan(torch.empty(n, 5))
        assert len(triton_plan._PLANS) <= 3


def test_statistics_only_forward_refuses_running_averages():
    """The running averages are updated by the normalize pass: a forward without it cannot update them."""
    x = make_input((5, 3, 7, 6), seed=54)
    with pytest.raises(ValueError, match="want_y=False.*running_mean and counter None"):
        triton_ops.forward_train(x, None, None, 1e-5, torch.zeros(3), torch.ones(3), 0.1, want_y=False)
    _, stats, _, _ = triton_ops.forward_train(x, None, None, 1e-5, want_y=False)
    assert_close(stats[0], ref.moments(np64(x)).mean, 1e-9, "statistics only: mean")
