"""What a SyncBatchNorm rank's backward sums cost, centred about its own mean, against the whole sums.

Claim measured (docs/benchmark_rounds.md, *twenty-ninth session*): bnlab.sync_steps.local_grad_sums (the
CPU kernels' centred sums about the rank's own mean, then four float64 operations on (C,) tensors
that move them to the group's mean) costs a few microseconds more than the kernels' sums alone.
Contenders, on one rank's float32 (x, dy) with dy = 8 + 0.01·noise and a group mean 1e-3 off the
rank's: "whole" (grad_sums about the group's mean, SyncBatchNorm before 2026-12-05), "centred"
(grad_sums about the rank's mean, batch_mean=True: the kernel part of the new form) and "local"
(local_grad_sums). Each round times --reps calls of each, in orders where every contender follows
every other equally often (bench_timing.balanced_orders); medians over the rounds, microseconds.

    PYTHONPATH=src python benchmarks/sync_sums_cost.py [--shapes 256,100 64,256,14,14] [--rounds 24]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import parse_and_announce, positive_int, shapes_parser  # noqa: E402
from bench_timing import balanced_orders  # noqa: E402

from bnlab.backends import get_backend  # noqa: E402
from bnlab.sync_steps import local_grad_sums  # noqa: E402

DEFAULT_SHAPES = ("256,100", "32,64,56,56", "64,256,14,14")


def contenders(shape) -> dict:
    """{name: zero-argument call} for one rank's float32 batch of ``shape``."""
    cpu = get_backend("cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    dy = 8 + 0.01 * torch.randn(shape, generator=gen)
    own = cpu.moments(x).mean
    group = own + 1e-3  # the group's mean: near the rank's, as it is for a share of one batch
    invstd = torch.ones(shape[1], dtype=torch.float64)
    return {
        "whole": lambda: cpu.grad_sums(dy, x, group, invstd),
        "centred": lambda: cpu.grad_sums(dy, x, own, invstd, True),
        "local": lambda: local_grad_sums(dy, x, own, group, invstd, cpu),
    }


def measure(shape, rounds: int, reps: int) -> dict[str, float]:
    """{contender: median microseconds per call} over ``rounds`` balanced rounds of ``reps`` calls."""
    calls = contenders(shape)
    times = {name: [] for name in calls}
    orders = balanced_orders(list(calls))
    for fn in calls.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            start = time.perf_counter()
            for _ in range(reps):
                calls[name]()
            times[name].append((time.perf_counter() - start) / reps * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    p = shapes_parser(__doc__, DEFAULT_SHAPES)
    p.add_argument("--rounds", type=positive_int, default=24, help="balanced rounds (default 24)")
    p.add_argument("--reps", type=positive_int, default=20, help="calls per sample (default 20)")
    args = parse_and_announce(p, argv, "sync_sums_cost.py", "microseconds per call, medians over balanced rounds")
    print(f"# --rounds {args.rounds} --reps {args.reps}")
    print(f"{'shape':18s} {'whole':>9s} {'centred':>9s} {'local':>9s} {'local - centred':>16s}")
    for shape in args.shapes:
        t = measure(shape, args.rounds, args.reps)
        print(f"{str(tuple(shape)):18s} {t['whole']:9.1f} {t['centred']:9.1f} {t['local']:9.1f} "
              f"{t['local'] - t['centred']:+16.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
