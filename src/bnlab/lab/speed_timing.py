"""Timing of contenders that do the same work: interleaved samples, medians.

Used by the lab's ``speed`` experiment and by the benchmark scripts (benchmarks/bench_bn.py and
the scripts that time as it does).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["balanced_orders", "interleaved_samples", "medians", "time_interleaved", "ratio_median", "ratio_quartiles",
           "cpu_model"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says (possibly empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_samples(fns: dict[str, Callable[[], object]], device: str, rounds: int,
                        min_sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of each callable in each of ``rounds`` interleaved samples: {name: [rounds]}.

    Each sample repeats a call enough times to last about ``min_sample_s`` (small shapes take
    tens of microseconds), measured with the host clock around a device synchronisation. Round r
    runs the contenders in the order r of balanced_orders (cyclically): 4 orders for 4
    contenders, 10 for 5 (with torch.compile), so the balance is exact when ``rounds`` is a
    multiple of that count and nearly so otherwise.
    """
    inner = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - start, 1e-7)
        inner[name] = max(1, math.ceil(min_sample_s / one))
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    orders = balanced_orders(names)
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            fn, k = fns[name], inner[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / k)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """{name: median of its samples}: the figure each contender is reported by."""
    return {name: statistics.median(v) for name, v in samples.items()}


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int, min_sample_s: float) -> dict:
    """Median seconds per call of each callable over ``rounds`` interleaved samples
    (:func:`interleaved_samples`): {name: seconds}."""
    return medians(interleaved_samples(fns, device, rounds, min_sample_s))


def _round_ratios(samples: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """samples[numerator][r] / samples[denominator][r] for every round r, sorted."""
    return sorted(n / d for n, d in zip(samples[numerator], samples[denominator]))


def ratio_median(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median of the per-round ratios samples[numerator][r] / samples[denominator][r]: the
    figure a ratio is reported by. Why not the ratio of the two medians: when the machine changes
    speed during a case (a VM's neighbour), each contender's median can come from another phase; in
    the fifty-sixth session a (256, 100) eval read 3.12x torch.nn that way, where every round but
    one read 3.06-3.89x (benchmarks/results/ratio_of_medians_zen4_s56.txt). The contenders of a
    round ran side by side, so the round's ratio is what the pairing protects."""
    return statistics.median(_round_ratios(samples, numerator, denominator))


def ratio_quartiles(samples: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """[first quartile, third quartile] of the per-round ratios samples[numerator][r] /
    samples[denominator][r]: the middle half of what one round would have said (the same value
    twice for one round). Why per round: the contenders of a round ran side by side, so a round the
    machine was busy slows both and moves their ratio less than either time."""
    ratios = _round_ratios(samples, numerator, denominator)
    if len(ratios) == 1:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]
