"""How much the contender that runs before changes an eval measured against a warm copy.

Claim measured (docs/benchmarks.md, *Noise*): at cache-resident shapes, the ratio of bnlab's
module eval to `copy_` (a copy into a buffer allocated once) depends on the cache state the
previous contender leaves. Two orders, each a cycle of interleaved samples (every sample
repeats its call ~60 times, medians of --rounds samples):

    after-copy:   copy_ -> bnlab                      (bnlab always right after the copy, as
                                                       in bench_bn.py's rotation)
    after-bnlab:  copy_ -> bnlab (warm-up) -> bnlab   (the timed bnlab call follows a bnlab
                                                       layer writing the same pooled output)

    PYTHONPATH=src python benchmarks/eval_order.py --shape 64,256,14,14 [--layout cl]
"""

from __future__ import annotations

import statistics
import time

import torch

import bnlab
from bench_cases import make_input, positive_int, shape_parser
from bnlab.lab.tables import counted


def _median_us(order: list, timed: set, rounds: int, reps: int) -> dict:
    samples = {name: [] for name, _ in order if name in timed}
    for _ in range(rounds):
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            if name in timed:
                samples[name].append((time.perf_counter() - start) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> None:
    p = shape_parser(__doc__, "64,256,14,14")
    p.add_argument("--layout", default="nchw", choices=["nchw", "cl"])
    p.add_argument("--rounds", type=positive_int, default=25)
    p.add_argument("--reps", type=positive_int, default=60, help="calls per sample")
    args = p.parse_args(argv)
    shape = args.shape
    torch.set_num_threads(args.threads)
    x = make_input(shape, args.layout, torch.float32, "cpu")
    dst = torch.empty_like(x)
    layers = [bnlab.BatchNorm2d(shape[1]).eval() for _ in range(2)]

    def copy_():
        dst.copy_(x)

    def bn(layer):
        return lambda: layer(x)

    with torch.no_grad():  # inference; main() leaves grad mode as it found it
        for fn in (copy_, bn(layers[0]), bn(layers[1])):
            for _ in range(5):
                fn()
        after_copy_order = [("copy_", copy_), ("bnlab", bn(layers[0]))]
        after_bnlab_order = [("copy_", copy_), ("warm", bn(layers[1])), ("bnlab", bn(layers[0]))]
        after_copy = _median_us(after_copy_order, {"copy_", "bnlab"}, args.rounds, args.reps)
        after_bnlab = _median_us(after_bnlab_order, {"copy_", "bnlab"}, args.rounds, args.reps)
    print(f"shape {shape} {args.layout}, {counted(args.threads, 'thread')}, "
          f"medians of {args.rounds} samples x {args.reps} calls")
    for label, m in (("after-copy", after_copy), ("after-bnlab", after_bnlab)):
        print(f"{label:12s} copy_ {m['copy_']:7.1f} us  bnlab {m['bnlab']:7.1f} us  "
              f"fraction of copy_ {m['copy_'] / m['bnlab']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
