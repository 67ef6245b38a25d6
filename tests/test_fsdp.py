"""bnlab's layers under FSDP2 (torch.distributed.fsdp.fully_shard), on 2 gloo ranks of this machine.

FSDP2 shards the parameters as DTensors and gathers them around each forward and backward; BN's
buffers stay whole on every rank. Oracles, float64: torch.nn's BatchNorm2d under the same FSDP2
run (each rank normalizes its own batch), and, for bnlab.SyncBatchNorm (which torch.nn's cannot do
on the CPU), one process training on the whole global batch.
"""

from __future__ import annotations

import pytest
import torch

import fsdp_workers
from bnlab.launch import run_local_ranks

WORLD = 2
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def runs() -> dict:
    per_rank = run_local_ranks(fsdp_workers.fsdp_runs, WORLD, (("torch", "bnlab", "sync"),), timeout_s=240)
    return {bn: [ranks[bn] for ranks in per_rank] for bn in per_rank[0]}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=1e-10, atol=1e-10)


def test_bnlab_under_fsdp_trains_as_torch_nn_does(runs):
    for rank in range(WORLD):
        ours, theirs = runs["bnlab"][rank], runs["torch"][rank]
        assert ours["state"].keys() == theirs["state"].keys()
        for key in ours["state"]:
            assert _close(ours["state"][key], theirs["state"][key]), (rank, key)
        assert _close(ours["probe"], theirs["probe"]), rank
    # each rank's own batches: the two ranks' running averages differ (what SyncBatchNorm is for)
    assert not _close(runs["bnlab"][0]["state"]["1.running_mean"], runs["bnlab"][1]["state"]["1.running_mean"])


def test_sync_batch_norm_under_fsdp_trains_as_one_process_on_the_global_batch(runs):
    one = fsdp_workers.train(fsdp_workers.make_model("bnlab"), fsdp_workers.batches(WORLD))
    expected = {k: v.detach() for k, v in one.state_dict().items()}
    for rank in range(WORLD):
        got = runs["sync"][rank]["state"]
        for key, value in expected.items():
            assert _close(got[key], value), (rank, key)
    assert int(runs["sync"][0]["state"]["1.num_batches_tracked"]) == fsdp_workers.STEPS
