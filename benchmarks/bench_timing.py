"""A call's median time in microseconds, for the scripts that time one thing at a time.

(bench_bn.py interleaves its contenders instead: benchmarks that compare use that.)
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
