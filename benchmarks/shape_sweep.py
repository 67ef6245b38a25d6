"""Where bnlab's CPU modules fall behind torch.nn's, over shapes the main benchmark does not have.

Claim checked: no performance cliff outside bench_bn.py's six shapes. bench_bn.py measures the
issue's shapes; this sweep walks the others a user meets (3 channels of a channels-last image,
a handful of tabular features, rows of 10, 49 or 169 values, 3-d volumes, a batch of 2, a wide
layer of 8192 units at batch 2 and 8) in
float32, bf16, float16 and float64, training forward, training forward and backward (the input's
and the parameters' gradients, as a training step asks for them) and eval, and prints every case
sorted by bnlab's
speed relative to torch.nn (the first lines are the slowest), then how many fall below --worst.
Each case runs both modules alternately, --samples times each, every sample the median of
--reps calls; the table shows the medians. (It found float16 at 0.02-0.3x torch.nn's speed and
float32 rows of 7 channels at 0.54x, both since fixed: docs/benchmarks.md.)

    PYTHONPATH=src python benchmarks/shape_sweep.py [--threads 2] [--samples 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bnlab
from bench_cases import bn_layer, make_input

SHAPES = (
    (64, 3, 32, 32), (8, 3, 112, 112), (32, 40, 28, 28), (16, 100, 10), (4096, 7), (1024, 300),
    (8, 32, 8, 16, 16), (2, 2048, 7, 7), (512, 64, 1), (64, 96, 1), (4096, 13), (256, 24, 5), (2, 8192),
    (32, 256, 13, 13), (8, 8192),
)  # fmt: skip
MODES = ("train", "backward", "eval")  # backward: the training forward and its backward
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
def median_call_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def compare(shape, dtype: torch.dtype, channels_last: bool, mode: str, samples: int, reps: int):
    """(bnlab us, torch.nn us) for one case, medians of alternating samples."""
    layout = "cl" if channels_last else "nchw"
    x = make_input(shape, layout, dtype, "cpu")
    layers = [bn_layer(bnlab, len(shape), shape[1]), bn_layer(torch.nn, len(shape), shape[1])]
    if dtype == torch.float64:  # torch takes float32 parameters with 16-bit inputs only
        layers = [layer.double() for layer in layers]
    for layer in layers:
        layer.train(mode != "eval")
    if mode == "backward":
        xg = x.detach().requires_grad_()
        dy = make_input(shape, layout, dtype, "cpu", seed=1)
        calls = [(lambda m=layer: torch.autograd.grad(m(xg), [xg, *m.parameters()], dy)) for layer in layers]
    else:
        calls = [(lambda layer=layer: layer(x)) for layer in layers]
    found: list[list[float]] = [[], []]
    with torch.set_grad_enabled(mode == "backward"):
        for fn in calls:
            fn()
        for i in range(samples):
            for k in ((0, 1) if i % 2 else (1, 0)):
                found[k].append(median_call_us(calls[k], reps))
    return statistics.median(found[0]), statistics.median(found[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--samples", type=int, default=7, help="alternating samples per module (default 7)")
    p.add_argument("--reps", type=int, default=5, help="calls per sample, their median kept (default 5)")
    p.add_argument("--worst", type=float, default=0.9, help="count the cases below this speed ratio")
    args = p.parse_args(argv)
    for flag in ("threads", "samples", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            for channels_last in (False, True) if len(shape) == 4 else (False,):
                for mode in MODES:
                    ours, theirs = compare(shape, dtype, channels_last, mode, args.samples, args.reps)
                    layout = "channels_last" if channels_last else "contiguous"
                    rows.append((theirs / ours, shape, dname, layout, mode, ours, theirs))
    rows.sort()
    print(f"# shape_sweep.py --threads {args.threads} --samples {args.samples} --reps {args.reps}; torch {torch.__version__}")
    print("# speed vs torch.nn (>1: bnlab faster), shape, dtype, layout, mode, bnlab us, torch.nn us")
    for ratio, shape, dname, layout, mode, ours, theirs in rows:
        print(f"{ratio:6.2f}  {str(shape):20s} {dname:5s} {layout:14s} {mode:8s} {ours:9.1f} {theirs:9.1f}")
    below = [r for r in rows if r[0] < args.worst]
    print(f"{len(below)} of {len(rows)} cases below {args.worst}x torch.nn")


if __name__ == "__main__":
    main()
