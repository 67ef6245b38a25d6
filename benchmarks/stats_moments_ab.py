"""The portable backend's statistics (bnlab.stats.moments) of two versions: same bits, and time.

Claim checked (forty-eighth session): clamping the scale and summing the shift from the scaled
values keeps every result's bits where the old code gave finite statistics, at the same cost.
The old version is a copy of another revision's src/bnlab/stats.py, e.g.

    git show 974ada4:src/bnlab/stats.py > /tmp/stats_old.py
    PYTHONPATH=src python benchmarks/stats_moments_ab.py --old /tmp/stats_old.py

Bits: random shapes (2-4 dims), scales 1e-30..1e30 with offsets up to 1000 standard deviations,
float32, float64 and bfloat16. Time: both versions called in turn on the same tensors, the order
flipping every round, medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from bnlab import stats as new


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("stats_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_bits(old, cases: int, seed: int) -> tuple[int, int]:
    """(results compared, results that differ), each result a (mean, M2) pair."""
    gen = torch.Generator().manual_seed(seed)
    differ = total = 0
    for _ in range(cases):
        rank = int(torch.randint(2, 5, (1,), generator=gen))
        shape = [int(v) for v in torch.randint(1, 9, (rank,), generator=gen)]
        shape[0] = max(shape[0], 2)
        scale = 10 ** float(torch.empty(1).uniform_(-30, 30, generator=gen))
        offset = float(torch.randn(1, generator=gen)) * scale * float(torch.randint(0, 1000, (1,), generator=gen))
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
            a, b = old.moments(x), new.moments(x)
            total += 1
            differ += not (torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2))
    return total, differ


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="another revision's src/bnlab/stats.py")
    p.add_argument("--cases", type=int, default=400)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.old.is_file():
        p.error(f"--old: expected a copy of another revision's src/bnlab/stats.py, got {str(args.old)!r}, which is not a file")
    torch.set_num_threads(args.threads)
    old = _load(args.old)
    total, differ = compare_bits(old, args.cases, seed=0)
    print(f"# stats_moments_ab.py --old {args.old}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"bits: {total} results compared, {differ} differ")
    for shape in [(32, 64, 56, 56), (128, 16, 32, 32), (256, 100), (8192, 100)]:
        x = torch.randn(shape) * 2 + 1
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name, module in (("old", old), ("new", new)) if r % 2 else (("new", new), ("old", old)):
                start = time.perf_counter()
                module.moments(x)
                times[name].append(time.perf_counter() - start)
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{str(shape):18s} old {o * 1e3:8.3f} ms  new {n * 1e3:8.3f} ms  new/old {n / o:.2f}")


if __name__ == "__main__":
    main()
