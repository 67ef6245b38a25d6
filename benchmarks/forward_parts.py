"""A training forward's kernel call against its two passes called alone, and a copy.

Claim measured (docs/benchmark_rounds.md, *nineteenth session*): how the fused training forward's time
compares with its statistics pass alone plus its normalize pass alone, at one shape. Each kernel
runs on its own tensors of the shape (``kernel_ab.kernel_calls``: the forward into an output, the
statistics without one, ``bn_normalize`` from given statistics), and ``copy_`` copies another
tensor of the shape into a buffer allocated once. The four are called in turn, each sample
repeating its call --reps times (so each finds its own data where its previous calls left it);
the table shows medians in microseconds. Against the build of another revision, run the script
with PYTHONPATH pointing at that revision's src (the kernels are those cpu_build loads).

    PYTHONPATH=src python benchmarks/forward_parts.py --shape 64,256,14,14 [--layout cl] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

from bench_cases import make_input, positive_int, shape_parser
from bnlab.backends import cpu_build
from kernel_ab import kernel_calls


def main(argv=None) -> None:
    p = shape_parser(__doc__, "64,256,14,14")
    p.add_argument("--layout", choices=("nchw", "cl"), default="nchw")
    p.add_argument("--rounds", type=positive_int, default=21, help="samples per call (default 21)")
    p.add_argument("--reps", type=positive_int, default=20, help="calls per sample (default 20)")
    args = p.parse_args(argv)
    lib = cpu_build.load()
    if lib is None or not hasattr(lib, "bn_empty"):
        raise SystemExit(f"bnlab's CPU kernels did not build as a module: {cpu_build.load_error()}")
    torch.set_num_threads(args.threads)
    calls = {
        name: kernel_calls((lib,), mode, args.shape, args.layout, torch.float32, args.threads).calls[0]
        for name, mode in (("training forward", "fwd"), ("statistics alone", "stats"), ("normalize alone", "eval"))
    }
    src = make_input(args.shape, args.layout, torch.float32, "cpu")
    dst = torch.empty_like(src)
    calls["copy_"] = lambda: dst.copy_(src)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(args.reps):
                call()
            times[name].append((time.perf_counter() - start) / args.reps)
    us = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    shape_text = ",".join(map(str, args.shape))
    print(f"# forward_parts.py --shape {shape_text} --layout {args.layout} --threads {args.threads}; "
          f"float32, microseconds, medians of {args.rounds} samples x {args.reps} calls; {cpu_build.library_path()}")
    for name, value in us.items():
        print(f"{name:20s} {value:9.1f}")
    parts = us["statistics alone"] + us["normalize alone"]
    print(f"{'the two alone, added':20s} {parts:9.1f}   forward / (the two added) {us['training forward'] / parts:.2f}")


if __name__ == "__main__":
    main()
