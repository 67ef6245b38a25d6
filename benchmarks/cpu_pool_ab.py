"""A/B of bnlab's CPU output pool: module calls with the pool off and on, in alternating processes.

Claim measured: outputs of 4 MiB or more taken from the pool (reused, huge-page memory) make a
call faster than outputs on fresh pages, which the OS zeroes first (docs/benchmark_rounds.md, "What
changed in the round of 2026-11-22"). The pool is configured once per process (BNLAB_CPU_CACHE_BYTES=0 turns it
off), so each sample is a separate process; off and on alternate, --pairs times. Each process
times the module's training forward, forward+backward and eval at the conv shapes on 2 threads
(median of 15 samples of 4 calls each) and prints one JSON line; this script prints, per case,
every process's median.

    PYTHONPATH=src python benchmarks/cpu_pool_ab.py --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (128, 16, 32, 32), (256, 64, 32, 32)]


def measure() -> dict:
    """One process's medians (ms): {shape: {mode: ms}}."""
    import torch

    import bnlab

    torch.set_num_threads(2)
    out = {}
    for shape in SHAPES:
        x, dy = torch.randn(shape), torch.randn(shape)
        train = bnlab.BatchNorm2d(shape[1])
        xg = x.clone().requires_grad_()
        inputs = [xg, *train.parameters()]
        evaluating = bnlab.BatchNorm2d(shape[1]).eval()

        def fwdbwd():
            torch.autograd.grad(train(xg), inputs, dy)

        def evaluate():
            with torch.no_grad():
                evaluating(x)

        cases = {"fwd": lambda: train(xg), "fwdbwd": fwdbwd, "eval": evaluate}
        out[str(shape)] = {}
        for mode, fn in cases.items():
            fn()  # warm-up: the pool's first block, the kernels' first call
            samples = []
            for _ in range(15):
                start = time.perf_counter()
                for _ in range(4):
                    fn()
                samples.append((time.perf_counter() - start) / 4 * 1e3)
            out[str(shape)][mode] = statistics.median(samples)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="off/on process pairs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return 0
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.pairs):
        for mode in ("off", "on"):
            env = dict(os.environ)
            env.pop("BNLAB_CPU_CACHE_BYTES", None)
            if mode == "off":
                env["BNLAB_CPU_CACHE_BYTES"] = "0"
            done = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| shape | mode | pool off (ms) | pool on (ms) |\n|---|---|---|---|")
    for shape in runs["on"][0]:
        for mode in ("fwd", "fwdbwd", "eval"):
            off = " / ".join(f"{r[shape][mode]:.2f}" for r in runs["off"])
            on = " / ".join(f"{r[shape][mode]:.2f}" for r in runs["on"])
            print(f"| {shape} | {mode} | {off} | {on} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
