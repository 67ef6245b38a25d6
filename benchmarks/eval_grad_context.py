"""What a ``with torch.no_grad()`` around every eval call costs, next to the eval and a copy.

Claim measured (docs/benchmark_rounds.md, thirty-sixth session): bench_bn.py timed each eval call
inside its own ``torch.no_grad()``, whose entry and exit cost about 2 us per call, paid by bnlab
and torch.nn and not by the copies their fraction of copy bandwidth is measured against; it now
enters one around the whole sample (bench_cases.sample_grad_mode), as inference runs under one
around the whole loop.

Contenders, in one rotation timed as bench_bn.py times its contenders (balanced orders, medians
of interleaved samples of repeated calls): the empty context alone, bnlab's and torch.nn's eval
with the context around each call and with it around the sample, and ``copy_`` into a buffer
allocated once. Prints microseconds per call and bnlab's fraction of ``copy_`` both ways.

    PYTHONPATH=src python benchmarks/eval_grad_context.py [--shapes conv-8,conv-32s,mlp-small] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bench_bn import SHAPES
from bench_cases import contenders, refuse_unknown_names
from bench_timing import balanced_orders


def per_call(fn):
    """fn with a no_grad entered and left around each call (the former bench_bn.py eval)."""

    def call():
        with torch.no_grad():
            return fn()

    return call


def time_case(shape, layout: str, rounds: int, min_sample: float) -> dict:
    """{name: microseconds per call} for one float32 eval case, every contender in one rotation.

    As bench_bn.time_interleaved (the orders of bench_timing.balanced_orders, samples of about
    ``min_sample`` seconds, medians), with each sample run in its contender's autograd mode:
    gradients on, or off around the whole sample (entered before the clock starts).
    """
    fns = contenders(shape, layout, torch.float32, "eval", "cpu", False)
    timed = {  # name: (callable, gradients on during its sample)
        "empty no_grad": (per_call(lambda: None), True),
        "bnlab, no_grad per call": (per_call(fns["bnlab"]), True),
        "torch, no_grad per call": (per_call(fns["torch"]), True),
        "bnlab, no_grad per sample": (fns["bnlab"], False),
        "torch, no_grad per sample": (fns["torch"], False),
        "copy_": (fns["copy_"], True),
    }
    reps = {}
    for name, (fn, grad) in timed.items():
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                fn()
            start = time.perf_counter()
            fn()
            reps[name] = max(1, math.ceil(min_sample / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in timed}
    orders = balanced_orders(list(timed))
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            (fn, grad), k = timed[name], reps[name]
            with torch.set_grad_enabled(grad):
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="conv-8,conv-32s,conv-14,mlp-small", help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--layouts", default="nchw", help="nchw and/or cl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--min-sample", type=float, default=0.02, help="seconds per sample")
    args = p.parse_args(argv)
    refuse_unknown_names(p, args, {"shapes": SHAPES, "layouts": ("nchw", "cl")})
    torch.set_num_threads(args.threads)
    print(f"# eval_grad_context.py --threads {args.threads} --rounds {args.rounds}; microseconds per call")
    for name in args.shapes.split(","):
        for layout in args.layouts.split(","):
            if layout == "cl" and len(SHAPES[name]) != 4:
                continue
            us = time_case(SHAPES[name], layout, args.rounds, args.min_sample)
            cells = "  ".join(f"{k} {v:.2f}" for k, v in us.items())
            print(f"{name}/{layout}: {cells}")
            print(f"    bnlab's fraction of copy_: no_grad per call {us['copy_'] / us['bnlab, no_grad per call']:.3f}, "
                  f"per sample {us['copy_'] / us['bnlab, no_grad per sample']:.3f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
