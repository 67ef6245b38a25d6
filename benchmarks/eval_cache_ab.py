"""Eval of layers with many channels and few values, with bnlab's kept coefficients and without.

Claim measured (docs/benchmark_rounds.md, forty-first session): where an eval call's per-channel
work outweighs its values (batch-1 or batch-2 inference, wide MLP layers), reusing the
coefficients computed from unchanged running statistics (cpu_kernels_eval_cache.inc) takes most of
the call away. The environment switch (BNLAB_EVAL_CACHE_BYTES=0: off) is read once per process,
so each round runs two child processes, the cache off and on, in alternating order; each child
times, per shape, bnlab's module call, torch.nn's and a ``copy_`` of the input into a buffer
allocated once inside torch.no_grad, and both module calls outside it, where the parameters'
requires_grad makes an output with a graph (inference without no_grad; frozen statistics while
training), which keeps the mean and invstd for its backward (medians of --samples samples of
--reps calls). Prints the medians over the rounds in microseconds, and bnlab's ratios.

    PYTHONPATH=src python benchmarks/eval_cache_ab.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import bnlab
from bench_cases import bn_layer, make_input, positive_int
from bench_timing import median_us

SHAPES = ((2, 8192), (8, 2048), (1, 2048, 7, 7), (1, 512, 14, 14), (16, 100), (256, 100), (1, 256, 56, 56))


def child(threads: int, samples: int, reps: int) -> dict:
    """{shape text: {"bnlab": us, "torch.nn": us, "copy_": us, "bnlab graph": us, "torch.nn graph": us}} in
    this process (its cache setting)."""
    torch.set_num_threads(threads)
    out = {}
    for shape in SHAPES:
        x = make_input(shape, "nchw", torch.float32, "cpu")
        ours, theirs = bn_layer(bnlab, x.dim(), shape[1]).eval(), bn_layer(torch.nn, x.dim(), shape[1]).eval()
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.running_var.uniform_(0.5, 2.0)
                layer.running_mean.normal_()
        dst = torch.empty_like(x)
        calls = {"bnlab": lambda: ours(x), "torch.nn": lambda: theirs(x), "copy_": lambda: dst.copy_(x)}
        with torch.no_grad():
            row = {name: median_us(fn, samples, reps) for name, fn in calls.items()}
        for name in ("bnlab", "torch.nn"):  # outside no_grad: outputs with a graph
            row[name + " graph"] = median_us(calls[name], samples, reps)
        out[",".join(map(str, shape))] = row
    return out


def run_child(cache_on: bool, args) -> dict:
    env = {**os.environ, "BNLAB_EVAL_CACHE_BYTES": str(8 << 20) if cache_on else "0"}
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--samples", str(args.samples),
           "--reps", str(args.reps)]  # fmt: skip
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=positive_int, default=3, help="pairs of child processes (default 3)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--samples", type=positive_int, default=9)
    p.add_argument("--reps", type=positive_int, default=400)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.samples, args.reps)))
        return
    runs = {False: [], True: []}
    for r in range(args.rounds):
        for on in (r % 2 == 0, r % 2 != 0):
            runs[on].append(run_child(on, args))
    print(f"# eval_cache_ab.py --rounds {args.rounds} --threads {args.threads}; torch {torch.__version__}; "
          f"microseconds, medians over the rounds of each child's medians")  # fmt: skip
    for graph in ("", " graph"):
        print(("with a graph" if graph else "in no_grad") + ": bnlab with the cache off and on, torch.nn, copy_")
        print(f"{'shape':18s} {'off':>8s} {'on':>8s} {'on/off':>7s} {'torch.nn':>9s} {'copy_':>7s} {'vs torch':>9s}")
        for key in runs[True][0]:
            med = {on: {n: statistics.median(run[key][n] for run in runs[on]) for n in runs[on][0][key]} for on in runs}
            off, on = med[False]["bnlab" + graph], med[True]["bnlab" + graph]
            torch_us, copy_us = med[True]["torch.nn" + graph], med[True]["copy_"]
            print(f"({key}){'':{16 - len(key)}s} {off:8.2f} {on:8.2f} {on / off:7.2f} {torch_us:9.2f} {copy_us:7.2f} "
                  f"{torch_us / on:8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
