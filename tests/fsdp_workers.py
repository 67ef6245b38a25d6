"""Rank functions for tests/test_fsdp.py (imported by the spawned processes: module level only)."""

from __future__ import annotations

import torch
from torch import nn

import bnlab

F64 = torch.float64
STEPS, LOCAL_BATCH = 3, 4


def make_model(bn: str) -> nn.Module:
    """conv -> BN -> ReLU -> linear head, float64, the same weights whatever the BN ("torch", "bnlab", "sync")."""
    torch.manual_seed(0)
    layer = {"torch": nn.BatchNorm2d, "bnlab": bnlab.BatchNorm2d, "sync": bnlab.SyncBatchNorm}[bn](8)
    return nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).to(F64)


def batches(world: int) -> list[torch.Tensor]:
    """The global batch of each step, (world·LOCAL_BATCH, 3, 6, 6); rank r takes rows r·LOCAL_BATCH..."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(world * LOCAL_BATCH, 3, 6, 6, generator=gen, dtype=F64) * 2 + 1 for _ in range(STEPS)]


def train(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """STEPS of SGD on the mean squared output."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in inputs:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def fsdp_runs(rank: int, world: int, kinds: tuple) -> dict:
    """{bn: fsdp_run(rank, world, bn)} for each BN kind, in one job (one process start)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {bn: fsdp_run(rank, world, bn, mesh) for bn in kinds}


def fsdp_run(rank: int, world: int, bn: str, mesh) -> dict:
    """Train make_model(bn) under FSDP2 (fully_shard) on this rank's share of each batch; the full
    parameters and BN buffers after training, and the eval output on a probe."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(bn)
    fully_shard(model, mesh=mesh)
    local = [x[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH] for x in batches(world)]
    train(model, local)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        probe = model(torch.linspace(-2, 2, 2 * 3 * 6 * 6, dtype=F64).reshape(2, 3, 6, 6))
    return {"state": state, "probe": probe}
