"""Run by tests/test_triton_large_offsets.py in a process of its own (a wrong offset reads memory
that is not mapped, and would end the test run): the two checks' results as one JSON line."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from bnlab.backends import triton_reduce  # noqa: E402
from bnlab.backends import triton_grad as grad  # noqa: E402


def merged_means() -> list[float]:
    """stats_merge_kernel's means of a (1, 3, 2**30 + 64) input whose channels hold the shifts
    5, 6, 7 (channel 2 starts at 2**31 + 128), from partials of one segment (count 1, mean 0)."""
    channels, length = 3, 2**30 + 64
    x = torch.empty(channels * length, dtype=torch.bfloat16).view(1, channels, length)  # pages left untouched
    for c in range(channels):
        x[0, c, 0] = 5.0 + c
    partials = torch.zeros(1, channels, 3, dtype=torch.float64)
    partials[0, :, 0] = 1.0
    stats = torch.empty(3, channels, dtype=torch.float64)
    coef = torch.empty(3, channels, dtype=torch.float32)
    triton_reduce.stats_merge_kernel[(channels,)](partials, x, stats, coef, x, x, channels, 1, length, 1e-5,
                                                  HAS_W=False, HAS_B=False, BLOCK_S=1)
    return stats[0].tolist()


def centred_partial_sums() -> list[float]:
    """grad_ncl_kernel's Σ(dy - g)·(x - hi) of each channel's first tile, centred, on a
    (2, 4, 2**29 + 64) input (C·L passes 2**31) serving as both dy and x, zero but for the 16
    values of channel c that centre_shift samples, 8 + c, eight of which lie in that tile: 0 where
    the shift g is their 8 + c (with the int32 stride the samples of n = 1 lay before the start)."""
    n, channels, length = 2, 4, 2**29 + 64
    t = torch.empty(n * channels * length, dtype=torch.bfloat16).view(n, channels, length)  # untouched pages read 0
    total = n * length
    for c in range(channels):  # four runs of four, a quarter of N·L apart
        for i in range(16):
            j = (i // 4) * (total // 4) + i % 4
            t[j // length, c, j % length] = 8.0 + c
    hi = torch.zeros(channels, dtype=torch.float32)
    stats = torch.zeros(3, channels, dtype=torch.float64)
    part = torch.full((1, channels, 2), float("nan"), dtype=torch.float64)
    block_l = 16
    grad.grad_ncl_kernel[(channels, 1)](t, t, t, hi, stats, part, n, channels, length, triton.cdiv(length, block_l), 1, 1,
                                        channels * length, n * length, BLOCK_N=2, BLOCK_L=block_l, HAS_MASK=False,
                                        UNROLL=1, CENTRED=True)
    return part[0, :, 1].tolist()


if __name__ == "__main__":
    try:
        torch.empty(2**32 + 512, dtype=torch.bfloat16)  # (an allocation refused under strict overcommit)
    except RuntimeError as err:
        print(json.dumps({"skip": str(err)}))
        sys.exit(0)
    print(json.dumps({"merged_means": merged_means(), "centred_partial_sums": centred_partial_sums()}))
