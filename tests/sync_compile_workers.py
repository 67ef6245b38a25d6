"""What runs inside the spawned ranks of tests/test_sync_compile.py: each case's steps through an
eager bnlab.SyncBatchNorm and through a torch.compile'd twin of it, interleaved, with raw
results, the collectives each issued and the compiled graphs' code returned for the test
process to compare."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.distributed import count_collectives
from sync_workers import _state, case_groups, step_outputs


def _step(call, layer, x_rows, dy_rows, x_grad: bool) -> dict:
    """Forward and backward of one step on this rank's rows; an error raised in the forward is recorded."""
    x = x_rows.clone().requires_grad_(x_grad)
    before = _state(layer)
    with count_collectives() as forward_calls:
        try:
            y = call(x)
        except ValueError as error:
            return {"error": str(error), "state_before": before, "state_after": _state(layer)}
    with count_collectives() as backward_calls:
        y.backward(dy_rows)
    record = {**step_outputs(layer, y, x), "collectives": (dict(forward_calls), dict(backward_calls))}
    layer.zero_grad(set_to_none=True)
    return record


def _recording_backend(name: str, codes: list):
    """The torch.compile backend ``name``, appending each graph's code to ``codes`` first.

    (Not torch._dynamo.testing's counter: importing that module in the test process imports
    inductor and triton before tests/test_triton.py sets up Triton's interpreter, whose kernels
    then fail to call their helpers.)"""
    compile_with = torch._dynamo.lookup_backend(name)

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return compile_with(gm, example_inputs)

    return backend


def _run_case(case: dict, group, member: int) -> dict:
    eager = bnlab.SyncBatchNorm(**case["layer"], process_group=group)
    twin = bnlab.SyncBatchNorm(**case["layer"], process_group=group)
    for layer in (eager, twin):
        layer.load_state_dict(case["init"], strict=True)
    codes: list = []
    compiled = torch.compile(
        twin, backend=_recording_backend(case["backend"], codes), fullgraph=True, dynamic=case["dynamic"]
    )
    steps = []
    for step in case["steps"]:
        lo = sum(step["sizes"][:member])
        rows = slice(lo, lo + step["sizes"][member])
        x, dy = step["x"][rows], step["dy"][rows]
        if case.get("channels_last"):
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        eager_step = _step(eager, eager, x, dy, case["x_grad"])
        steps.append({"eager": eager_step, "compiled": _step(compiled, twin, x, dy, case["x_grad"])})
        steps[-1]["graphs_so_far"] = len(codes)
    return {"steps": steps, "graphs": len(codes), "code": codes}


def _ddp_states(ddp_case: dict, rank: int, world_size: int, compiled: bool) -> tuple[dict, list, list]:
    """A small conv net with two SyncBatchNorm layers trained under DDP, eager or compiled (the
    model wrapped by DDP, then compiled, as torch's docs do it); its final state and each step's
    collectives (DDP's own gradient all_reduce runs in C++ and is not counted), and the code of
    the graphs compiled."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bnlab.SyncBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                        bnlab.SyncBatchNorm(3), nn.Flatten(), nn.Linear(27, 5)).double()  # fmt: skip
    ddp = nn.parallel.DistributedDataParallel(net)
    codes: list = []
    run = torch.compile(ddp, backend=_recording_backend("aot_eager", codes)) if compiled else ddp
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    collectives = []
    for step in ddp_case["steps"]:
        lo = sum(step["sizes"][:rank])
        rows = slice(lo, lo + step["sizes"][rank])
        optimizer.zero_grad()
        with count_collectives() as calls:
            loss = F.cross_entropy(run(step["x"][rows]), step["target"][rows], reduction="sum")
            (loss * (world_size / sum(step["sizes"]))).backward()
        collectives.append(dict(calls))
        optimizer.step()
    return _state(net), collectives, codes


def _exported_step(rank: int) -> dict:
    """A conv + SyncBatchNorm + ReLU model's training step on this rank's batch, eager and through
    torch.export (the exported program's module): outputs, input gradients, parameters'
    gradients and state, and the exported graph's code."""
    torch.manual_seed(3)
    eager = nn.Sequential(nn.Conv2d(2, 3, 1), bnlab.SyncBatchNorm(3), nn.ReLU()).double()
    twin = nn.Sequential(nn.Conv2d(2, 3, 1), bnlab.SyncBatchNorm(3), nn.ReLU()).double()
    twin.load_state_dict(eager.state_dict())
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(3 + rank, 2, 3, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn(3 + rank, 3, 3, 3, generator=gen, dtype=torch.float64)
    program = torch.export.export(twin, (x,))
    exported = program.module()
    out = {"code": program.graph_module.code}
    for name, model in (("eager", eager), ("exported", exported)):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(dy)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        out[name] = {"y": y.detach(), "dx": xi.grad, "grads": grads, "state": _state(model)}
    return out


def compiled_sync_checks(rank: int, world_size: int, cases: list[dict], ddp_case: dict) -> dict:
    """Entry point of every rank: each case on its group (the world, or a group of some ranks),
    then the DDP and export runs on the world."""
    groups = case_groups(cases, world_size)
    results = {}
    for case in cases:
        if rank in case["ranks"]:
            torch._dynamo.reset()
            results[case["name"]] = _run_case(case, groups[tuple(case["ranks"])], case["ranks"].index(rank))
    torch._dynamo.reset()
    results["ddp"] = {mode: _ddp_states(ddp_case, rank, world_size, mode == "compiled") for mode in ("eager", "compiled")}
    results["export"] = _exported_step(rank)
    return results
