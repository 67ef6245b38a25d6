"""Forward+backward time of bnlab.SyncBatchNorm against local BN at 1-4 ranks, and collectives per step.

What it measures: each rank runs training steps (forward, then backward with a fixed upstream
gradient) of every layer variant on its own (N, C, H, W) batch. Variants are interleaved and
their order rotates every repeat, and all ranks pass a barrier before each timed step, so a
step's time includes waiting for the other ranks in the collectives, as in training. Reported:
the median over repeats, then the largest median over ranks (the group moves at its slowest
rank's pace), and the collectives each variant issues per step (bnlab.distributed.count_collectives).
The row "collectives alone" times SyncBatchNorm's all_gather and all_reduce with the same message
sizes and no BN around them: SyncBatchNorm ≈ local bnlab BN + collectives alone.

    PYTHONPATH=src python benchmarks/bench_sync.py                         # CPU, gloo, 1-4 ranks
    PYTHONPATH=src python benchmarks/bench_sync.py --device cuda --world-sizes 1
        # one GPU: adds torch.nn.SyncBatchNorm (torch's own layer; at world size 1 it runs torch's local BN)
    PYTHONPATH=src python benchmarks/bench_sync.py --device cuda --backend gloo --world-sizes 1,2
        # one GPU shared by 2 ranks over gloo: exercises the synchronised path on CUDA tensors
    PYTHONPATH=src python benchmarks/bench_sync.py --device cuda --backend nccl --world-sizes 2,4
        # several GPUs, one per rank
    ... --check-no-sync   # CUDA: one step of each bnlab variant under torch.cuda.set_sync_debug_mode("error")

Results: docs/benchmarks.md, section "SyncBatchNorm".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab.distributed import all_reduce_grad_sums, count_collectives, gather_moments
from bnlab.lab.tables import counted
from bnlab.launch import run_local_ranks
from bnlab.stats import Moments

COLLECTIVES_ONLY = "collectives alone"


def _variants(channels: int, device: str) -> dict[str, nn.Module]:
    layers = {
        "bnlab.BatchNorm2d (local)": bnlab.BatchNorm2d(channels),
        "bnlab.SyncBatchNorm": bnlab.SyncBatchNorm(channels),
        "torch.nn.BatchNorm2d (local)": nn.BatchNorm2d(channels),
    }
    if device == "cuda":  # torch.nn.SyncBatchNorm refuses CPU tensors
        layers["torch.nn.SyncBatchNorm"] = nn.SyncBatchNorm(channels)
    return {name: layer.to(device) for name, layer in layers.items()}


def _measure(rank: int, world_size: int, cfg: dict) -> dict:
    """Runs on every rank: per variant, the median step time (ms) and the collectives of one step."""
    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(cfg["shape"], generator=gen) * 2 + 1).to(device)
    dy = torch.randn(cfg["shape"], generator=gen).to(device)
    layers = _variants(cfg["shape"][1], device)

    def sync_device():
        if device == "cuda":
            torch.cuda.synchronize()

    channels = cfg["shape"][1]
    stats = Moments(cfg["shape"][0], torch.zeros(channels, dtype=torch.float64, device=device),
                    torch.ones(channels, dtype=torch.float64, device=device))  # fmt: skip

    def step(layer):
        if layer is None:  # the two collectives of a SyncBatchNorm step, with its message sizes, alone
            if world_size > 1:
                merged, _ = gather_moments(stats)
                all_reduce_grad_sums(merged.mean, merged.m2)
            return
        xi = x.detach().requires_grad_()
        layer(xi).backward(dy)

    layers[COLLECTIVES_ONLY] = None
    for layer in layers.values():
        for _ in range(cfg["warmup"]):
            step(layer)
    collectives = {}
    for name, layer in layers.items():
        with count_collectives() as calls:
            step(layer)
        collectives[name] = dict(calls)
    no_sync = {}
    if cfg["check_no_sync"] and device == "cuda":
        for name in (n for n in layers if n.startswith("bnlab.")):
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(layers[name])
                no_sync[name] = "no host sync"
            except RuntimeError as error:
                no_sync[name] = f"host sync: {str(error).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
    names = list(layers)
    times = {name: [] for name in names}
    for repeat in range(cfg["repeats"]):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order: no variant always goes first
            if world_size > 1:
                dist.barrier()
            sync_device()
            start = time.perf_counter()
            step(layers[name])
            sync_device()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"median_ms": medians, "collectives": collectives, "no_sync": no_sync}


def _table(results: list[dict]) -> str:
    names = list(results[0]["median_ms"])
    lines = ["| ranks | " + " | ".join(names) + " | SyncBN / local bnlab | collectives per step (SyncBN) |",
             "|---|" + "---|" * (len(names) + 2)]  # fmt: skip
    for r in results:
        ms = r["median_ms"]
        ratio = ms["bnlab.SyncBatchNorm"] / ms["bnlab.BatchNorm2d (local)"]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"]["bnlab.SyncBatchNorm"].items())) or "none"
        lines.append(f"| {r['world_size']} | " + " | ".join(f"{ms[n]:.3f} ms" for n in names) + f" | {ratio:.2f} | {calls} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2,3,4", help="comma-separated numbers of ranks")
    parser.add_argument("--shape", default="16,32,16,16", help="per-rank input N,C,H,W")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--check-no-sync", action="store_true", help="CUDA: fail a bnlab step that syncs the host")
    parser.add_argument("--out", help="also write the results as JSON here (atomically)")
    args = parser.parse_args()
    cfg = {
        "shape": tuple(int(v) for v in args.shape.split(",")),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": args.device,
        "check_no_sync": args.check_no_sync,
    }
    results = []
    for world_size in (int(v) for v in args.world_sizes.split(",")):
        per_rank = run_local_ranks(
            _measure, world_size, (cfg,), backend=args.backend, threads_per_rank=args.threads_per_rank, timeout_s=600
        )
        worst = {name: max(r["median_ms"][name] for r in per_rank) for name in per_rank[0]["median_ms"]}
        results.append({"world_size": world_size, "median_ms": worst, "collectives": per_rank[0]["collectives"],
                        "no_sync": per_rank[0]["no_sync"]})  # fmt: skip
        print(f"ranks={world_size}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in worst.items()), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name(0)}"
    print(f"\nper-rank input {cfg['shape']} float32, {args.device}, {args.backend}, "
          f"{counted(args.threads_per_rank, 'thread')} per rank, median of {args.repeats}; {machine}\n")  # fmt: skip
    print(_table(results))
    for r in results:
        if r["no_sync"]:
            print(f"ranks={r['world_size']}: {r['no_sync']}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"config": {**vars(args), **cfg}, "machine": machine, "results": results}, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
