"""bnlab.recalibrate under torch.distributed: 2 gloo ranks on loopback give the single-process result.

The ranks are spawned processes joined through a FileStore in a temporary directory; every wait
has a timeout (the process group's and the join's), so a broken collective fails the test
instead of hanging CI.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
from torch import nn

import bnlab
from bnlab.launch import leave_process_group
from features_util import assert_close

WORLD = 2
DEADLINE_S = 120


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), bnlab.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3)).double().eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 2 + 1 for n in (6, 3, 8, 5, 2)]


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        batches = _batches()
        model = _model()
        bnlab.recalibrate(model, batches[rank::WORLD], progress=False)  # uneven: 3 batches and 2 batches
        shared = _stats(model)
        model = _model()
        bnlab.recalibrate(model, batches if rank == 0 else [], progress=False)  # rank 1 has no data at all
        lopsided = _stats(model)
        torch.save({"shared": shared, "lopsided": lopsided}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_process_group()  # this test asserts the ranks' exit codes (bnlab.launch.leave_process_group)


def test_two_gloo_ranks_equal_the_single_process_result(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, str(tmp_path / "store"), str(tmp_path))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(timeout=10)
    assert not hung, f"ranks still running after {DEADLINE_S} s: killed"
    assert [p.exitcode for p in procs] == [0] * WORLD, f"rank exit codes {[p.exitcode for p in procs]}"

    single = _model()
    bnlab.recalibrate(single, _batches(), progress=False)
    expected = _stats(single)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for rank, result in enumerate(results):
        for key, value in expected.items():
            assert_close(result["shared"][key], value, 1e-12, f"rank {rank} {key}")
    for rank, result in enumerate(results):
        for key, value in expected.items():
            assert_close(result["lopsided"][key], value, 1e-12, f"rank {rank} {key} (rank 1 without data)")
