"""bnlab.SyncBatchNorm under torch.compile across real processes (gloo on loopback).

Across processes the layer's step goes through bnlab's operators while torch.compile traces it
(bnlab.custom_ops_sync), so ``fullgraph=True`` holds and the compiled layer must give the eager
layer's bits, issue the same collectives, and leave the same running averages. One 3-rank job
(bnlab.launch.run_local_ranks) runs every case below, eager and compiled interleaved on each
rank; the comparisons happen here.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from bnlab import custom_ops, reference
from bnlab.launch import run_local_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the ranks import the workers too
import sync_compile_workers  # noqa: E402

WORLD = 3
GEN = torch.Generator().manual_seed(20261203)


def _case(name, ranks, sizes_per_step, channels, tail, *, backend="aot_eager", dtype=torch.float64, affine=True,
          momentum=0.1, x_grad=True, channels_last=False, dynamic=None):  # fmt: skip
    init = {
        "running_mean": torch.randn(channels, generator=GEN, dtype=torch.float64).to(dtype),
        "running_var": (0.5 + torch.rand(channels, generator=GEN, dtype=torch.float64)).to(dtype),
        "num_batches_tracked": torch.tensor(1),
    }
    if affine:
        init["weight"] = (1 + 0.3 * torch.randn(channels, generator=GEN, dtype=torch.float64)).to(dtype)
        init["bias"] = torch.randn(channels, generator=GEN, dtype=torch.float64).to(dtype)
    steps = []
    view = (1, channels) + (1,) * len(tail)
    for sizes in sizes_per_step:
        shape = (sum(sizes), channels) + tail
        shift = torch.linspace(-3, 3, channels, dtype=torch.float64).view(view)  # a wrong merge shows
        x = torch.randn(shape, generator=GEN, dtype=torch.float64) * 2 + shift
        dy = torch.randn(shape, generator=GEN, dtype=torch.float64)
        steps.append({"sizes": sizes, "x": x.to(dtype), "dy": dy.to(dtype)})
    layer = dict(num_features=channels, momentum=momentum, affine=affine, dtype=dtype)
    return {"name": name, "ranks": ranks, "layer": layer, "init": init, "steps": steps, "backend": backend,
            "x_grad": x_grad, "channels_last": channels_last, "dynamic": dynamic}  # fmt: skip


CASES = [
    _case("uneven_with_an_empty_rank", [0, 1, 2], [[3, 0, 2]] * 3, 3, (5,)),
    _case("group_of_two_ranks_no_affine", [0, 2], [[2, 3]] * 2, 2, (2, 3), affine=False, momentum=None),
    # no input gradient wanted (a first layer's input): the backward all_reduce is skipped on every rank
    _case("no_input_gradient", [0, 1, 2], [[2, 1, 2]] * 2, 3, (4,), x_grad=False),
    _case("inductor_float32_channels_last", [0, 1, 2], [[2, 3, 1]] * 2, 4, (3, 3), backend="inductor",
          dtype=torch.float32, channels_last=True),  # fmt: skip
    # dynamic=True: one graph for every batch size (sizes >= 2: torch.compile specializes 0 and 1)
    # (channels and length unlike any batch size: torch.compile duck-sizes equal sizes as one symbol)
    _case("dynamic_batch_sizes", [0, 1, 2], [[2, 3, 4], [4, 2, 3], [3, 3, 2]], 5, (7,), dynamic=True),
    # step 1: one value per channel in the whole group, so every rank raises from inside the compiled graph
    _case("one_value_error", [0, 1, 2], [[2, 1, 1], [0, 1, 0], [2, 1, 1]], 2, (1,)),
]
CASE_BY_NAME = {case["name"]: case for case in CASES}
DDP_CASE = {"steps": [
    {"sizes": sizes, "x": torch.randn(sum(sizes), 2, 3, 3, generator=GEN, dtype=torch.float64),
     "target": torch.randint(0, 5, (sum(sizes),), generator=GEN)}
    for sizes in ([2, 5, 1], [3, 3, 2], [1, 2, 2])
]}  # fmt: skip
NAMES = list(CASE_BY_NAME)


@pytest.fixture(scope="module")
def ranks_out():
    """Every rank's results of the one 3-rank job (4 minutes at most; inductor compiles in each rank)."""
    return run_local_ranks(
        sync_compile_workers.compiled_sync_checks, WORLD, (CASES, DDP_CASE), timeout_s=240, collective_timeout_s=180
    )


def _members(ranks_out, case):
    return [ranks_out[r][case["name"]] for r in case["ranks"]]


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_steps_give_the_eager_bits(ranks_out, name):
    case = CASE_BY_NAME[name]
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        for i, step in enumerate(member["steps"]):
            eager, compiled = step["eager"], step["compiled"]
            where = f"{name} step {i} rank {rank}"
            if "error" in eager:  # the same message, and no state changed by the rejected batch
                assert compiled.get("error") == eager["error"], where
                for key, value in compiled["state_before"].items():
                    assert torch.equal(compiled["state_after"][key], value), f"{where}: {key}"
                continue
            assert "error" not in compiled, f"{where}: {compiled.get('error')}"
            for key in ("y", "dx", "dw", "db"):
                assert _equal(compiled[key], eager[key]), f"{where}: {key}"
            assert compiled["state"].keys() == eager["state"].keys(), where
            for key, value in eager["state"].items():
                assert _equal(compiled["state"][key], value), f"{where}: {key}"


@pytest.mark.parametrize("name", NAMES)
def test_compiled_steps_issue_one_collective_per_reduce_phase(ranks_out, name):
    case = CASE_BY_NAME[name]
    want = ({"all_gather": 1}, {"all_reduce": 1} if case["x_grad"] else {})
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        for i, step in enumerate(member["steps"]):
            if "error" not in step["eager"]:
                assert step["compiled"]["collectives"] == want, f"{name} step {i} rank {rank}"
                assert step["eager"]["collectives"] == want, f"{name} step {i} rank {rank}"


@pytest.mark.parametrize("name", NAMES)
def test_each_compiled_graph_is_whole_and_calls_the_operator(ranks_out, name):
    # fullgraph=True already fails a graph break; here the graph must hold the operator itself
    # (not, say, a local BN that silently skipped the synchronisation).
    case = CASE_BY_NAME[name]
    op = f"torch.ops.bnlab.sync_batch_norm_train.{custom_ops.OVERLOAD}("
    for rank, member in zip(case["ranks"], _members(ranks_out, case)):
        assert member["graphs"] >= 1 and all(op in code for code in member["code"]), f"{name} rank {rank}"
        if case["dynamic"]:  # the first step's graph serves every batch size after it
            # (>= 1 graph at the first step: with dynamic=True dynamo traces eps as a symbolic
            # float first, then restarts once with it constant; the backend sees both traces)
            assert member["graphs"] == member["steps"][0]["graphs_so_far"], f"{name} rank {rank}: recompiled"
        elif len({tuple(s["sizes"]) for s in case["steps"]}) == 1:  # one shape: compiled once
            assert member["graphs"] == 1, f"{name} rank {rank}: {member['graphs']} graphs"


@pytest.mark.parametrize("name", [n for n in NAMES if CASE_BY_NAME[n]["layer"]["dtype"] == torch.float64])
def test_compiled_steps_equal_the_float64_reference_on_the_global_batch(ranks_out, name):
    case = CASE_BY_NAME[name]
    members = _members(ranks_out, case)
    init = case["init"]
    gamma = init["weight"].numpy() if "weight" in init else None
    beta = init["bias"].numpy() if "bias" in init else None
    for i, spec in enumerate(case["steps"]):
        got = [m["steps"][i]["compiled"] for m in members]
        if any("error" in g for g in got):
            continue
        y, cache = reference.forward_train(spec["x"].numpy(), gamma, beta, eps=1e-5)
        dx, dw, db = reference.backward(spec["dy"].numpy(), cache)
        assert torch.allclose(torch.cat([g["y"] for g in got]), torch.from_numpy(y), rtol=0, atol=1e-9)
        if case["x_grad"]:
            assert torch.allclose(torch.cat([g["dx"] for g in got]), torch.from_numpy(dx), rtol=0, atol=1e-9)
        if gamma is not None:  # DDP sums (averages) parameter gradients over the ranks
            assert torch.allclose(sum(g["dw"] for g in got), torch.from_numpy(dw), rtol=0, atol=1e-9)
            assert torch.allclose(sum(g["db"] for g in got), torch.from_numpy(db), rtol=0, atol=1e-9)


def test_the_error_case_raised_on_every_rank(ranks_out):
    # Guards the case above: the error step must really have raised, compiled and eager.
    case = CASE_BY_NAME["one_value_error"]
    for member in _members(ranks_out, case):
        step = member["steps"][1]
        assert step["compiled"]["error"].startswith("input: expected more than 1 value per channel"), step["compiled"]
        assert "[0, 1, 0]" in step["compiled"]["error"]
        assert "y" in member["steps"][2]["compiled"]  # and the ranks stayed in step after it


def test_ddp_training_compiled_equals_eager(ranks_out):
    # torch.compile(DistributedDataParallel(model)): DDP's optimizer splits the graph at its
    # gradient buckets; the SyncBatchNorm operators inside must leave three uneven steps' weights,
    # running averages and counters bit-equal to eager DDP's on every rank.
    for rank in range(WORLD):
        ddp = ranks_out[rank]["ddp"]
        (eager, eager_calls, _), (compiled, compiled_calls, codes) = ddp["eager"], ddp["compiled"]
        op = f"torch.ops.bnlab.sync_batch_norm_train.{custom_ops.OVERLOAD}("
        assert sum(code.count(op) for code in codes) >= 2, f"rank {rank}: the layers were not compiled as operators"
        assert compiled.keys() == eager.keys() and len(eager) == 16, rank
        for key, value in eager.items():
            assert _equal(compiled[key], value), f"rank {rank}: {key}"
        assert eager["1.num_batches_tracked"].item() == 3, rank  # the steps ran, in training mode
        assert compiled_calls == eager_calls == [{"all_gather": 2, "all_reduce": 2}] * 3, rank


def test_an_exported_model_gives_the_eager_bits(ranks_out):
    # torch.export keeps the layer as the operator; running the exported program's module on
    # each rank synchronises as the eager model does: same outputs, gradients and buffers.
    op = f"torch.ops.bnlab.sync_batch_norm_train.{custom_ops.OVERLOAD}("
    for rank in range(WORLD):
        got = ranks_out[rank]["export"]
        assert op in got["code"], rank
        eager, exported = got["eager"], got["exported"]
        for key in ("y", "dx"):
            assert _equal(exported[key], eager[key]), f"rank {rank}: {key}"
        assert exported["grads"].keys() == eager["grads"].keys() and len(eager["grads"]) == 4, rank
        for key, value in eager["grads"].items():
            assert _equal(exported["grads"][key], value), f"rank {rank}: gradient of {key}"
        assert exported["state"].keys() == eager["state"].keys(), rank
        for key, value in eager["state"].items():
            assert _equal(exported["state"][key], value), f"rank {rank}: {key}"
        assert eager["state"]["1.num_batches_tracked"].item() == 1, rank
