"""What runs inside the spawned ranks of tests/test_sync_compile.py: each case's steps through an
eager bnlab.SyncBatchNorm and through a torch.compile'd twin of it, interleaved, with raw
results, the collectives each issued and the compiled graphs' code returned for the test
process to compare."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

import bnlab
from bnlab.distributed import count_collectives


def _state(layer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


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
    record = {
        "y": y.detach(),
        "dx": x.grad,
        "dw": None if layer.weight is None else layer.weight.grad.clone(),
        "db": None if layer.bias is None else layer.bias.grad.clone(),
        "state": _state(layer),
        "collectives": (dict(forward_calls), dict(backward_calls)),
    }
    layer.zero_grad(set_to_none=True)
    return record


def _run_case(case: dict, group, member: int) -> dict:
    eager = bnlab.SyncBatchNorm(**case["layer"], process_group=group)
    twin = bnlab.SyncBatchNorm(**case["layer"], process_group=group)
    for layer in (eager, twin):
        layer.load_state_dict(case["init"], strict=True)
    counter = CompileCounterWithBackend(case["backend"])
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    steps = []
    for step in case["steps"]:
        lo = sum(step["sizes"][:member])
        rows = slice(lo, lo + step["sizes"][member])
        x, dy = step["x"][rows], step["dy"][rows]
        if case.get("channels_last"):
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        steps.append({"eager": _step(eager, eager, x, dy, case["x_grad"]), "compiled": _step(compiled, twin, x, dy, case["x_grad"])})
    return {"steps": steps, "graphs": counter.frame_count, "code": [g.code for g in counter.graphs]}


def compiled_sync_checks(rank: int, world_size: int, cases: list[dict]) -> dict:
    """Entry point of every rank: each case on its group (the world, or a group of some ranks)."""
    groups = {}
    for case in cases:  # every rank creates every group, in the same order (torch's rule)
        ranks = tuple(case["ranks"])
        if ranks not in groups:
            groups[ranks] = None if ranks == tuple(range(world_size)) else dist.new_group(list(ranks))
    results = {}
    for case in cases:
        if rank in case["ranks"]:
            torch._dynamo.reset()
            results[case["name"]] = _run_case(case, groups[tuple(case["ranks"])], case["ranks"].index(rank))
    return results
