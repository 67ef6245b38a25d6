"""bnlab's training step under two thresholds of its CPU output pool, between torch.nn steps.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02, second session*): outputs of a few
hundred KB to 4 MiB, which bnlab used to take from malloc, often came back on fresh pages (zeroed
by the OS, page by page) whenever other work ran between two BN calls, as torch.nn's layer does in
bench_bn.py's rotation and any network's other layers do in training; from the pool they do not.

One process, one bnlab module: its steps (forward + backward, gradients returned) run with
cpu_pool.POOL_MIN_BYTES set to each threshold in turn, and every bnlab sample follows a sample of
torch.nn's layer on the same shape (order: torch, bnlab at threshold A, torch, bnlab at threshold B,
repeated). Each sample is --calls steps; the table shows medians of --rounds samples in ms.

    PYTHONPATH=src python benchmarks/pool_threshold.py [--threads 2] [--low 262144] [--high 4194304]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import sample_seconds  # noqa: E402

import bnlab  # noqa: E402
from bnlab.backends import cpu_build, cpu_pool  # noqa: E402

SHAPES = [(256, 100), (1024, 64), (2048, 100), (8192, 100), (8, 64, 16, 16), (16, 64, 16, 16), (64, 64, 8, 8),
          (32, 256, 14, 14)]  # fmt: skip


def train_step(lib, shape):
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    layer = (lib.BatchNorm1d if len(shape) == 2 else lib.BatchNorm2d)(shape[1])
    params = list(layer.parameters())

    def step():
        return torch.autograd.grad(layer(x), [x] + params, dy)

    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--low", type=int, default=256 << 10, help="threshold A in bytes (default 256 KiB)")
    p.add_argument("--high", type=int, default=4 << 20, help="threshold B in bytes (default 4 MiB)")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--rounds", type=int, default=11)
    args = p.parse_args(argv)
    if min(args.low, args.high) < 0 or args.threads < 1:
        p.error("--low/--high: expected byte counts >= 0; --threads: expected >= 1")
    lib = cpu_build.load()
    if lib is None or not hasattr(lib, "bn_empty"):
        raise SystemExit(f"bnlab's pool needs the compiled module, which did not build: {cpu_build.load_error()}")
    torch.set_num_threads(args.threads)
    saved = cpu_pool.POOL_MIN_BYTES
    print(f"# pool_threshold.py --threads {args.threads}: ms per training step, medians of {args.rounds} "
          f"samples x {args.calls} calls, each bnlab sample after a torch.nn sample")  # fmt: skip
    print(f"{'shape':20s} {'MB':>6s} {'torch.nn':>9s} {'bnlab@' + str(args.high >> 10) + 'K':>12s} "
          f"{'bnlab@' + str(args.low >> 10) + 'K':>12s} {'ratio':>6s}")  # fmt: skip
    try:
        for shape in SHAPES:
            ours, theirs = train_step(bnlab, shape), train_step(torch.nn, shape)
            times = {"torch": [], "high": [], "low": []}
            for which in ("high", "low"):
                cpu_pool.POOL_MIN_BYTES = getattr(args, which)
                ours(), ours()
            for _ in range(args.rounds):
                for which in ("high", "low"):
                    times["torch"].append(sample_seconds(theirs, args.calls) * 1e3)
                    cpu_pool.POOL_MIN_BYTES = getattr(args, which)
                    times[which].append(sample_seconds(ours, args.calls) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            mb = torch.zeros(shape).numel() * 4 / 1e6
            print(f"{str(shape):20s} {mb:6.2f} {med['torch']:9.3f} {med['high']:12.3f} {med['low']:12.3f} "
                  f"{med['low'] / med['high']:6.2f}", flush=True)  # fmt: skip
    finally:
        cpu_pool.POOL_MIN_BYTES = saved


if __name__ == "__main__":
    main()
