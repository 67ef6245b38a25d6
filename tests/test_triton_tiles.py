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
