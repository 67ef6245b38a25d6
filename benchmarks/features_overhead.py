"""What the feature options cost per training step (forward + backward), next to plain bnlab BN and torch.nn.

Claim measured: the non-finite guard (on by default) adds a few tiny per-channel kernels per step,
and the variants cost what their extra passes suggest. Method: every configuration runs once per
round, rounds interleave the configurations (so machine noise hits all alike), and the table
reports the median over rounds and the ratio to plain bnlab with the guard off.

    PYTHONPATH=src python benchmarks/features_overhead.py [--shape 32 64 28 28] [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import bnlab
from bnlab.stats import Moments, update_running_stats_


def _configs(n: int, c: int) -> dict:
    """name -> (layer, whether it gets the mask)."""
    return {
        "torch.nn": (torch.nn.BatchNorm2d(c), False),
        "bnlab, guard off": (bnlab.BatchNorm2d(c, skip_nonfinite=False), False),
        "bnlab (default: guard on)": (bnlab.BatchNorm2d(c), False),
        "ghost, 4 ghost batches": (bnlab.BatchNorm2d(c, virtual_batch_size=max(n // 4, 2)), False),
        "renorm": (bnlab.BatchNorm2d(c, renorm=True), False),
        "masked (70 % selected)": (bnlab.BatchNorm2d(c), True),
        "accumulation_steps=4": (bnlab.BatchNorm2d(c, accumulation_steps=4), False),
    }


def guard_cost(c: int, rounds: int = 2000) -> tuple[float, float]:
    """Median µs of one running-statistics update with the guard on and off (interleaved)."""
    stats = Moments(1000, torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) * 1000)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    times = {True: [], False: []}
    for _ in range(rounds):
        for guard in (True, False):
            start = time.perf_counter()
            update_running_stats_(running_mean, running_var, stats, 0.1, skip_nonfinite=guard)
            times[guard].append(time.perf_counter() - start)
    return statistics.median(times[True]) * 1e6, statistics.median(times[False]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 28, 28])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    n, c, h, w = args.shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    dy = torch.randn_like(x)
    mask = torch.rand(n, h, w) < 0.7
    configs = _configs(n, c)
    times: dict[str, list[float]] = {name: [] for name in configs}

    def step(layer, masked):
        xi = x.detach().requires_grad_()
        y = layer(xi, mask=mask) if masked else layer(xi)
        y.backward(dy)

    for layer, extra in configs.values():  # warm-up
        step(layer, extra)
    for _ in range(args.rounds):
        for name, (layer, extra) in configs.items():
            start = time.perf_counter()
            step(layer, extra)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bnlab, guard off"])
    print(f"shape {tuple(args.shape)} float32, {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| configuration | median ms / step | vs bnlab guard off |")
    print("|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x |")
    on, off = guard_cost(c)
    print(f"\nrunning-statistics update alone, C={c}: guard on {on:.1f} µs, guard off {off:.1f} µs (median of 2000)")


if __name__ == "__main__":
    main()
