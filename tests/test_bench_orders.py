"""balanced_orders (bnlab.lab.speed_timing, re-exported by benchmarks/bench_timing.py): the orders in
which bench_bn.py and the lab's speed experiment interleave their contenders.

The property that matters for the benchmark: no contender always follows the same other one (the
call after a large copy pays for the copy's cache state for a whole sample), checked by counting.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_timing import balanced_orders  # noqa: E402


@pytest.mark.parametrize("n", range(1, 10))
def test_every_contender_follows_every_other_equally_often(n):
    names = [f"contender{i}" for i in range(n)]
    orders = balanced_orders(names)
    assert all(sorted(order) == sorted(names) for order in orders)
    follows = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    # every ordered pair of distinct names is adjacent, and equally often
    assert set(follows) == {(a, b) for a in names for b in names if a != b}
    assert len(set(follows.values())) <= 1
    firsts = Counter(order[0] for order in orders)
    assert set(firsts) == set(names) and len(set(firsts.values())) == 1


def test_a_rotation_is_not_balanced():
    """The check above fails for the rotation bench_bn.py used before (so it can tell the two apart)."""
    names = ["bnlab", "torch", "copy", "copy_"]
    rotation = [names[i:] + names[:i] for i in range(len(names))]
    follows = Counter((a, b) for order in rotation for a, b in zip(order, order[1:]))
    assert follows[("copy_", "bnlab")] == 3 and follows[("bnlab", "copy_")] == 0
    balanced = Counter((a, b) for order in balanced_orders(names) for a, b in zip(order, order[1:]))
    assert balanced[("copy_", "bnlab")] == balanced[("bnlab", "copy_")] == 1


def test_the_bench_uses_the_balanced_orders():
    """time_interleaved (bench_bn.py's and the lab's speed experiment's) runs each round in the next
    of balanced_orders' orders."""
    import bench_bn

    from bnlab.lab import speed_timing

    assert bench_bn.time_interleaved is speed_timing.time_interleaved
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c", "d")}
    speed_timing.time_interleaved(fns, "cpu", rounds=4, min_sample_s=0.0)
    warmup = 4 * len(fns)  # three warm-up calls and one timing call each, in dict order
    timed = calls[warmup:]
    assert [timed[i * 4 : (i + 1) * 4] for i in range(4)] == balanced_orders(list(fns))


def test_ratio_quartiles_are_those_of_the_ratios_round_by_round():
    """[q1, q3] of numerator / denominator taken in each round, not of either time's spread: here
    the rounds read 2, 1, 0.5, 2, 1, whose inclusive quartiles are 1 and 2."""
    from bnlab.lab import speed_timing

    samples = {"torch": [2.0, 2.0, 2.0, 2.0, 2.0], "bnlab": [1.0, 2.0, 4.0, 1.0, 2.0]}
    assert speed_timing.ratio_quartiles(samples, "torch", "bnlab") == [1.0, 2.0]
    assert speed_timing.ratio_quartiles({"a": [3.0], "b": [2.0]}, "a", "b") == [1.5, 1.5]
    # the same spread in both times but in opposite rounds widens the ratios' spread
    wide = speed_timing.ratio_quartiles({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, "a", "b")
    assert wide == pytest.approx([2 / 3, 2.0])
