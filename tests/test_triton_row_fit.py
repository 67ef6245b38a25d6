"""The reduce kernels' NCL rows in tiles fitted to their length (triton_plan.ROW_FIT, off by default
until a GPU has timed it): the widths chosen, the plans, and the kernels under them in Triton's
interpreter against the float64 reference and torch.nn (training steps and eval, the fused ReLU layer)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bnlab.backends import triton_plan  # noqa: E402
from bnlab.backends.triton_plan import row_width  # noqa: E402


@pytest.mark.parametrize("k,width,expected", [
    (3136, 1024, 256),    # 56 x 56: 1024 leaves 23 % idle, 256 leaves 6 % (64: none, but more than 1/16 narrower)
    (12544, 1024, 1024),  # 112 x 112: 6 % already
    (784, 1024, 64),      # 28 x 28: 23 % -> 6 % at the floor (width / 16)
    (196, 1024, 256),     # 14 x 14: nothing at or above the floor idles less
    (1024, 1024, 1024), (4096, 1024, 1024), (35, 64, 8), (45, 64, 16), (301, 64, 64), (3, 64, 4), (1, 64, 1),
])  # fmt: skip
def test_row_width_is_the_widest_tile_within_a_16th_of_the_least_idle_lanes(k, width, expected):
    assert row_width(k, width) == expected
    got = row_width(k, width)
    assert got & (got - 1) == 0 and got <= max(1, min(1 << (k - 1).bit_length(), width))


def test_row_fit_changes_ncl_plans_only_and_is_part_of_the_plan_key(monkeypatch):
    x, cl = torch.empty(128, 256, 56, 56, device="meta"), torch.empty(8, 256, 56, 56, device="meta")
    cl = cl.to(memory_format=torch.channels_last)
    default, default_cl = triton_plan.plan(x, for_gpu=True), triton_plan.plan(cl, for_gpu=True)
    assert (default.block_b, default.block_k) == (1024, 1024)
    monkeypatch.setattr(triton_plan, "ROW_FIT", True)
    fit = triton_plan.plan(x, for_gpu=True)
    assert fit.block_b == 256 and fit.block_a * fit.block_b == default.block_a * default.block_b  # same tile size
    assert fit._replace(block_a=default.block_a, block_b=default.block_b, segments=default.segments,
                        per_segment=default.per_segment) == default  # the reduce tiles only  # fmt: skip
    assert triton_plan.plan(cl, for_gpu=True) == default_cl  # rows of channels: unchanged
    monkeypatch.setattr(triton_plan, "ROW_FIT", False)
    assert triton_plan.plan(x, for_gpu=True) == default  # not a stale plan from the cache


@pytest.fixture
def fitted(monkeypatch):
    pytest.importorskip("triton")
    from bnlab.backends import _REGISTRY, PortableBackend
    from bnlab.backends.triton_backend import TritonBackend

    monkeypatch.setattr(triton_plan, "ROW_FIT", True)
    backend = TritonBackend(allow_cpu=True)
    saved = list(_REGISTRY)
    _REGISTRY[:] = [backend, PortableBackend()]
    yield backend
    _REGISTRY[:] = saved


# rows of 35, 45 and 49 values: under the interpreter's width of 64 the reduce kernels take tiles
# of 8, 16 and 8 instead of 64 (several tiles per row, the last one partly idle, several rows per tile)
@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (4, 5, 9, 5), (3, 2, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_under_fitted_rows_match_the_reference(fitted, shape, dtype):
    from speed_helpers import assert_backend_matches_reference, make_input

    p = triton_plan.plan(make_input(shape, "nchw", dtype, seed=0))
    assert p.ncl and p.block_b < 64, p  # the fitted tiles, not the default ones
    assert_backend_matches_reference(fitted, shape, "nchw", dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_modules_under_fitted_rows_match_torch_nn(fitted, residual, monkeypatch):
    import bnlab
    from torch import nn

    from bnlab.backends import triton_ops

    plans = []
    forward_train = triton_ops.forward_train
    monkeypatch.setattr(triton_ops, "forward_train", lambda *a, **k: plans.append(k["p"]) or forward_train(*a, **k))
    shape = (6, 4, 5, 7)
    torch.manual_seed(0)
    ours = bnlab.BatchNormAct2d(4, residual=residual)
    theirs = nn.BatchNorm2d(4)
    for step in range(2):
        x = torch.randn(shape) * 2 + step
        res = torch.randn(shape) if residual else None
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = ours(x1, res) if residual else ours(x1)
        y2 = torch.relu(theirs(x2) + (res if residual else 0))
        dy = torch.randn(shape)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y1, y2, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert len(plans) == 2 and all(p.ncl and p.block_b == 8 for p in plans)  # the Triton kernels, fitted rows
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        x = torch.randn(shape)
        res = torch.randn(shape) if residual else None
        torch.testing.assert_close(ours(x, res) if residual else ours(x), torch.relu(theirs(x) + (res if residual else 0)),
                                   rtol=2e-4, atol=2e-4)  # fmt: skip
