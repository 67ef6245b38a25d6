"""Timing helpers: a call's median time for the scripts that time one thing at a time, and the
orders in which bench_bn.py interleaves the contenders it compares.
"""

from __future__ import annotations

import statistics
import time


def median_us(fn, rounds: int, reps: int) -> float:
    """Median over ``rounds`` samples of the mean time of ``reps`` back-to-back calls of fn, after
    ``reps`` warm-up calls; microseconds."""
    for _ in range(reps):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(samples)


def balanced_orders(names: list) -> list[list]:
    """Orders of ``names`` in which every name directly follows every other equally often.

    Why: the call that follows a large copy starts from caches full of the copy's lines and is
    slower for a whole sample, whichever call it is. A rotation (round r starts at name r) keeps
    the cyclic order, so the same name follows the copy in every round and alone pays for it.
    These are the rows of a Williams square: n orders for an even number of names, each ordered
    pair adjacent exactly once; 2n for an odd number (the rows and their reverses), each pair twice.
    Every name also comes first equally often.
    """
    n = len(names)
    # 0, 1, n-1, 2, n-2, ...: successive differences 1, -2, 3, -4, ... are distinct modulo n
    first, low, high = [0][:n], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(k + i) % n for k in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[names[k] for k in row] for row in rows]


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
