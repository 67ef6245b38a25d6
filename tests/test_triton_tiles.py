"""triton_plan.parse_tiles and the unroll of the reduce kernels' plans (torch only: no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from bnlab.backends import triton_plan
from bnlab.backends.triton_plan import Tiles, parse_tiles


def test_five_fields_keep_the_default_unroll_and_a_sixth_sets_it():
    assert parse_tiles("4096,8,2048,4,1024") == Tiles(4096, 8, 2048, 4, 1024, Tiles().unroll)
    assert parse_tiles("2048,4,2048,4,1024,3").unroll == 3  # any positive unroll, not only powers of two


@pytest.mark.parametrize("text", ["2048,4,2048,4,1024,0", "2048,4,2048,4,1024,-2", "2048,4,2048,4,1024,2,2",
                                  "2048,4,2048,4", "2048,4,2048,3,1024,2", "2048,4,2048,4,1024,x"])  # fmt: skip
def test_bad_tiles_are_refused_naming_the_fields(text):
    with pytest.raises(ValueError, match="unroll") as info:
        parse_tiles(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("dtype,unrolled", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False),
                                            (torch.float64, False)])  # fmt: skip
def test_16_bit_plans_carry_the_tiles_unroll_and_wider_ncl_inputs_take_one_tile_per_step(dtype, unrolled):
    x = torch.empty(8, 3, 5, 7, dtype=dtype)
    assert triton_plan.plan(x, for_gpu=True).ncl
    assert triton_plan.plan(x, for_gpu=True, tiles=parse_tiles("2048,4,2048,4,1024,3")).unroll == (3 if unrolled else 1)
    assert triton_plan.plan(x, for_gpu=True).unroll == (triton_plan.GPU_TILES.unroll if unrolled else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channels_last_plans_carry_the_tiles_unroll_whatever_the_element_size(dtype):
    # measured on an H200: float32 channels-last statistics 4061 GB/s at four tiles per step, 2949 at one
    x = torch.empty(8, 3, 5, 7, dtype=dtype).to(memory_format=torch.channels_last)
    p = triton_plan.plan(x, for_gpu=True, tiles=parse_tiles("2048,4,2048,4,1024,3"))
    assert not p.ncl and p.unroll == 3
    flat = triton_plan.plan(torch.empty(64, 3, dtype=dtype), for_gpu=True)  # (N, C): rows of channels too
    assert not flat.ncl and flat.unroll == triton_plan.GPU_TILES.unroll


@pytest.mark.parametrize("dtype,layout,stats_unroll,grads_unroll", [
    (torch.float32, "nchw", 1, 1), (torch.float32, "cl", 4, 1), (torch.bfloat16, "nchw", 4, 2),
    (torch.bfloat16, "cl", 4, 2),
])  # fmt: skip
def test_tiles_per_step_the_reduce_kernels_are_launched_with(monkeypatch, dtype, layout, stats_unroll, grads_unroll):
    # the launches themselves, in the interpreter: 32-bit gradient sums take one tile per step (two
    # spilled 40 bytes under Triton 3.6), 16-bit ones at most two (triton_plan.GRAD_UNROLL_MAX)
    pytest.importorskip("triton")
    from bnlab.backends import triton_launch, triton_ops

    launched = {}
    launch = triton_launch.launch

    def record(kernel, grid, *args, **kwargs):
        launched[kernel.fn.__name__] = kwargs.get("UNROLL")
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_launch, "launch", record)
    monkeypatch.setattr(triton_ops, "SMALL_NUMEL", 0)  # the general kernels
    x = torch.randn(6, 5, 4, 7).to(dtype)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    p = triton_plan.plan(x, for_gpu=False, tiles=parse_tiles("128,4,128,4,64,4"))
    y, stats, coef, _ = triton_ops.forward_train(x, None, None, 1e-5, p=p)
    triton_ops.backward(y, x, stats, coef[0].contiguous(), None, p=p)
    kind = "ncl" if layout == "nchw" else "nlc"
    assert (p.unroll, p.grad_unroll) == (stats_unroll, grads_unroll)  # the plan decides both
    assert launched[f"stats_{kind}_kernel"] == stats_unroll and launched[f"grad_{kind}_kernel"] == grads_unroll
