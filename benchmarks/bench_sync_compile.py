"""A compiled ResNet-20 training step with bnlab.SyncBatchNorm across processes: whole graph vs broken.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-03, fifteenth session*): what compiling
SyncBatchNorm whole (its step as bnlab::sync_batch_norm_* operators, bnlab.custom_ops_sync)
changes in a compiled network's training step, against the same model compiled as before,
with its graph broken at every SyncBatchNorm layer, and against the eager model. The network is
the lab's ResNet-20 (19 BN layers) with every BN converted to bnlab.SyncBatchNorm; each rank
trains on its own batch of random CIFAR-sized images (forward, cross-entropy, backward, SGD).
Every rank runs the variants in the same orders (bench_timing.balanced_orders), one step per
sample after a barrier, so a sample includes waiting for the other ranks in the collectives;
reported are the largest of the ranks' medians (the group moves at its slowest rank's pace),
the collectives of one step and the number of graphs each compiled variant was cut into.

    PYTHONPATH=src python benchmarks/bench_sync_compile.py [--ranks 2] [--batch 64] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import positive_int  # noqa: E402
from bench_model_step import operators_off, own_backend, step_fn  # noqa: E402
from bench_timing import balanced_orders  # noqa: E402

import bnlab  # noqa: E402
from bnlab.distributed import count_collectives  # noqa: E402
from bnlab.launch import run_local_ranks  # noqa: E402
from bnlab.lab.models import resnet20  # noqa: E402

WHOLE, BREAKS, EAGER = "compiled, whole graph", "compiled, graph breaks", "eager"


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return bnlab.SyncBatchNorm.convert_sync_batchnorm(resnet20(bn_impl="bnlab"))


def _measure(rank: int, world_size: int, cfg: dict) -> dict:
    """Runs on every rank: per variant, the median step time (ms), collectives and graph count."""
    torch._dynamo.config.recompile_limit = 64  # the graph-broken variant's frames recompile once (below)
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(cfg["batch"], 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (cfg["batch"],), generator=gen)
    graphs = {WHOLE: [], BREAKS: []}
    steps = {
        WHOLE: step_fn(torch.compile(_model(), backend=own_backend("inductor", graphs[WHOLE])), images, labels),
        BREAKS: step_fn(torch.compile(_model(), backend=own_backend("inductor", graphs[BREAKS])), images, labels),
        EAGER: step_fn(_model(), images, labels),
    }
    breaks = steps[BREAKS]

    def with_breaks():
        with operators_off():  # compiled and run as before bnlab.custom_ops_sync: a graph break per layer
            breaks()

    steps[BREAKS] = with_breaks
    first_call_s, collectives = {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        with count_collectives() as calls:
            step()  # compilation, outside the samples
        first_call_s[name] = time.perf_counter() - start
        collectives[name] = dict(calls)
        # Again without the counting wrappers: the graph-broken variant traced into torch.distributed
        # and guarded on the wrapped functions, so it recompiles once here, not in a sample.
        step()
    times = {name: [] for name in steps}
    orders = balanced_orders(list(steps))
    for r in range(cfg["rounds"]):
        for name in orders[r % len(orders)]:
            dist.barrier()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {
        "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "collectives": collectives,
        "graphs": {name: len(g) for name, g in graphs.items()},
        "first_call_s": first_call_s,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=64, help="images per rank")
    p.add_argument("--rounds", type=positive_int, default=15, help="samples per variant (one step each)")
    p.add_argument("--threads-per-rank", type=positive_int, default=1)
    args = p.parse_args(argv)
    if args.ranks < 2:
        p.error(f"--ranks: expected 2 or more (one process does not synchronise), got {args.ranks}")
    cfg = {"batch": args.batch, "rounds": args.rounds}
    per_rank = run_local_ranks(
        _measure, args.ranks, (cfg,), threads_per_rank=args.threads_per_rank, timeout_s=1800, collective_timeout_s=900
    )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"# bench_sync_compile.py --ranks {args.ranks} --batch {args.batch} --rounds {args.rounds} "
          f"--threads-per-rank {args.threads_per_rank}; ResNet-20 with bnlab.SyncBatchNorm, gloo; {machine}")  # fmt: skip
    print("# variant: slowest rank's median ms per step; collectives of one step; graphs; first call (s) per rank")
    worst = {name: max(r["median_ms"][name] for r in per_rank) for name in per_rank[0]["median_ms"]}
    for name, ms in worst.items():
        first = ", ".join(f"{r['first_call_s'][name]:.1f}" for r in per_rank)
        graphs = per_rank[0]["graphs"].get(name, "-")
        print(f"{name:24s} {ms:9.2f}  {per_rank[0]['collectives'][name]}  graphs {graphs}  first call {first}")
    ratios = worst[BREAKS] / worst[WHOLE], worst[EAGER] / worst[WHOLE]
    print(f"graph breaks / whole graph {ratios[0]:.3f}; eager / whole graph {ratios[1]:.3f}")


if __name__ == "__main__":
    main()
