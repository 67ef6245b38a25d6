"""How many rank processes of bnlab.launch.run_local_ranks abort at exit after reporting their result.

Claim checked (docs/benchmark_rounds.md, forty-third session): ranks that trained a
DistributedDataParallel model died now and then with "terminate called without an active
exception" (SIGABRT) at interpreter exit, their group still held by DDP's reference cycles;
``leave_process_group`` collects those before destroying the group. Each run starts 2 ranks that
train a small DDP MLP for 20 steps (torch.nn's BatchNorm1d, or bnlab's SyncBatchNorm) and exit;
the ranks' stderr is counted, run by run, in a child interpreter per variant.

    PYTHONPATH=src python benchmarks/rank_exit_aborts.py [--runs 30]
(with PYTHONPATH at an earlier checkout's src to count there.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def train_ddp(rank: int, world_size: int, kind: str) -> float:
    import torch
    from torch import nn

    import bnlab

    torch.manual_seed(0)
    norm = nn.BatchNorm1d if kind == "torch" else bnlab.BatchNorm1d
    model = nn.Sequential(nn.Linear(20, 16), norm(16), nn.ReLU(), nn.Linear(16, 4))
    if kind == "bnlab":
        model = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        loss = ddp(torch.randn(8, 20)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def _child(kind: str, runs: int) -> None:
    from bnlab.launch import run_local_ranks

    for _ in range(runs):
        run_local_ranks(train_ddp, 2, (kind,), timeout_s=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--child", choices=["torch", "bnlab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.runs)
        return
    for kind in ("torch", "bnlab"):
        done = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", kind, "--runs", str(args.runs)],
                              capture_output=True, text=True)
        aborts = done.stderr.count("terminate called")
        print(f"{kind:6s} {args.runs} runs, {2 * args.runs} rank processes: {aborts} aborted at exit"
              f" (launcher exit code {done.returncode})", flush=True)


if __name__ == "__main__":
    main()
