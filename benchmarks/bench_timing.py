"""Timing helpers: a call's median time for the scripts that time one thing at a time; the orders
in which bench_bn.py interleaves the contenders it compares are bnlab.lab.speed_timing's
(re-exported here).
"""

from __future__ import annotations

import statistics
import time

from bnlab.lab.speed_timing import balanced_orders

__all__ = ["balanced_orders", "sample_seconds", "median_us", "events_us"]


def sample_seconds(fn, calls: int) -> float:
    """One sample: the mean time of ``calls`` back-to-back calls of fn, in seconds (no warm-up)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def median_us(fn, rounds: int, reps: int) -> float:
    """Median over ``rounds`` samples of the mean time of ``reps`` back-to-back calls of fn, after
    ``reps`` warm-up calls; microseconds."""
    for _ in range(reps):
        fn()
    return statistics.median(sample_seconds(fn, reps) * 1e6 for _ in range(rounds))


def events_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean GPU time of ``calls`` back-to-back calls of fn, in
    microseconds: CUDA events around them (the device's clock; the host waits only at the end)."""
    import torch

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)
