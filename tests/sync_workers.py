"""Functions that run inside the spawned ranks of the SyncBatchNorm tests (bnlab.launch.run_local_ranks).

They only run the distributed side and return raw tensors and counts; every comparison with an
oracle happens in the test process (tests/test_sync_distributed.py), so a wrong result shows up
as an ordinary assertion there.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.backends import register_backend
from bnlab.backends.portable import PortableBackend
from bnlab.distributed import count_collectives


class SpyBackend(PortableBackend):
    """The portable primitives, counting their calls: proves SyncBatchNorm goes through the selected backend."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def moments(self, x):
        self.calls["moments"] += 1
        return super().moments(x)

    def normalize(self, x, mean, invstd, weight, bias):
        self.calls["normalize"] += 1
        return super().normalize(x, mean, invstd, weight, bias)

    def grad_sums(self, dy, x, mean, invstd, batch_mean=False):
        self.calls["grad_sums"] += 1
        return super().grad_sums(dy, x, mean, invstd, batch_mean)

    def grad_input(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        self.calls["grad_input"] += 1
        return super().grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)

    def take(self) -> dict:
        calls, self.calls = dict(self.calls), Counter()
        return calls


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count Python-level reads of tensor values (.item(), bool(t), ...): each one syncs the host on CUDA.

    A CPU stand-in for torch.cuda.set_sync_debug_mode, which needs a GPU. The checks bnlab makes
    only in an eager CPU call, where a read costs no synchronisation (elementwise._eager_cpu: the
    large-spread dx, the overflowed sums), are switched off meanwhile, as on CUDA, where they never
    run: what is counted is what a CUDA step would read.
    """
    import bnlab.elementwise

    calls: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    eager_cpu = bnlab.elementwise._eager_cpu
    bnlab.elementwise._eager_cpu = lambda t: False

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        bnlab.elementwise._eager_cpu = eager_cpu


def _state(layer: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def step_outputs(layer: nn.Module, y: torch.Tensor, x: torch.Tensor) -> dict:
    """A BN layer's step after its backward: output, input and parameter gradients (None where
    absent) and its state."""
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw": None if layer.weight is None else layer.weight.grad.clone(),
        "db": None if layer.bias is None else layer.bias.grad.clone(),
        "state": _state(layer),
    }


def _run_step(layer, x_global, dy_global, lo, hi, spy) -> dict:
    """One training step on this rank's rows [lo, hi): forward, backward, and what each issued."""
    x = x_global[lo:hi].clone().requires_grad_()
    before = _state(layer)
    try:
        with count_collectives() as forward_calls, count_host_reads() as forward_reads:
            y = layer(x)
    except ValueError as error:
        spy.take()
        return {"error": str(error), "state_before": before, "state_after": _state(layer)}
    forward_primitives = spy.take()
    with count_collectives() as backward_calls, count_host_reads() as backward_reads:
        y.backward(dy_global[lo:hi])
    record = {
        **step_outputs(layer, y, x),
        "forward_collectives": dict(forward_calls),
        "backward_collectives": dict(backward_calls),
        "host_reads": {"forward": dict(forward_reads), "backward": dict(backward_reads)},
        "forward_primitives": forward_primitives,
        "backward_primitives": spy.take(),
    }
    layer.zero_grad(set_to_none=True)
    return record


def _run_scenario(case: dict, process_group, rank: int, spy: SpyBackend) -> dict:
    member = case["ranks"].index(rank)
    layer = bnlab.SyncBatchNorm(**case["layer"], process_group=process_group)
    layer.load_state_dict(case["init"], strict=True)  # saved from a bnlab BatchNorm*d: interchangeable
    steps = []
    for step in case["steps"]:
        lo = sum(step["sizes"][:member])
        steps.append(_run_step(layer, step["x"], step["dy"], lo, lo + step["sizes"][member], spy))
    result = {"steps": steps}
    if "eval_x" in case:
        lo = sum(case["eval_sizes"][:member])
        x = case["eval_x"][lo : lo + case["eval_sizes"][member]]
        layer.eval()
        spy.take()
        with count_collectives() as calls:
            result["eval_y"] = layer(x).detach()
        result["eval_collectives"] = dict(calls)
        result["eval_primitives"] = spy.take()
    return result


def build_model(norm: type, dtype=torch.float64) -> nn.Module:
    """A small conv net with two BN layers, used for the DDP test here and for its oracle in the tests."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        norm(3),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5),
    ).to(dtype)


class ResidualEnd(nn.Module):
    """conv -> BatchNormAct2d(residual=True) with the block's input as the residual -> linear: the
    end of a ResNet block, for the DDP test of SyncBatchNormAct2d (and its oracle in the tests)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = bnlab.BatchNormAct2d(2, residual=True)
        self.head = nn.Linear(2 * 3 * 3, 5)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.bn(self.conv(x), x).flatten(1))


def _ddp_train(case: dict, rank: int, world_size: int, model: nn.Module, init: str = "init") -> dict:
    """Train ``model`` (its state from case[init]) with its BN layers made SyncBatchNorm under DDP;
    return the final state dict and per-step collectives."""
    model.load_state_dict(case[init], strict=True)
    model = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=case["lr"], momentum=0.9)
    collectives = []
    for step in case["steps"]:
        lo = sum(step["sizes"][:rank])
        hi = lo + step["sizes"][rank]
        total = sum(step["sizes"])
        optimizer.zero_grad()
        with count_collectives() as calls:
            out = ddp(step["x"][lo:hi])
            # DDP averages gradients over ranks: scaling each rank's summed loss by W / total makes
            # that average the gradient of the global batch's mean loss, for uneven batches too.
            loss = F.cross_entropy(out, step["target"][lo:hi], reduction="sum") * (world_size / total)
            loss.backward()
        collectives.append(dict(calls))
        optimizer.step()
    return {"state": _state(model), "collectives": collectives, "types": sorted({type(m).__name__ for m in model.modules()})}


def case_groups(cases: list[dict], world_size: int) -> dict:
    """{ranks: process group} for the cases' ``ranks`` lists: None (the world) for all ranks, else a new group.

    Every rank must call this with the same cases: each creates every group, in the same order
    (torch's rule for new_group)."""
    groups = {}
    for case in cases:
        ranks = tuple(case["ranks"])
        if ranks not in groups:
            groups[ranks] = None if ranks == tuple(range(world_size)) else dist.new_group(list(ranks))
    return groups


def sync_checks(rank: int, world_size: int, cases: list[dict], ddp_case: dict) -> dict:
    """Entry point of every rank: each case on its group, then the DDP run on the world."""
    spy = SpyBackend()
    register_backend(spy)
    groups = case_groups(cases, world_size)
    results = {}
    for case in cases:
        if rank in case["ranks"]:
            results[case["name"]] = _run_scenario(case, groups[tuple(case["ranks"])], rank, spy)
    results["ddp"] = _ddp_train(ddp_case, rank, world_size, build_model(bnlab.BatchNorm2d))
    results["ddp_act"] = _ddp_train(ddp_case, rank, world_size, ResidualEnd(), "act_init")
    results["gradient_penalty"] = _gradient_penalty_error(rank)
    results["own_input_check"] = _own_input_check_calls(rank)
    results["outsider_channels"] = _outsider_channel_error(rank)
    return results


def _own_input_check_calls(rank: int) -> list[int]:
    """How many times a subclass's own _check_input_dim ran in one synchronised training call of
    SyncBatchNorm and of SyncBatchNormAct2d (torch.nn: once)."""
    counts = []
    for base in (bnlab.SyncBatchNorm, bnlab.SyncBatchNormAct2d):
        calls = []

        class OwnCheck(base):
            def _check_input_dim(self, input):
                calls.append(1)
                super()._check_input_dim(input)

        OwnCheck(3)(torch.randn(2 + rank, 3, 2, 2))
        counts.append(len(calls))
    return counts


def _outsider_channel_error(rank: int) -> str | None:
    """The error of a training call with the wrong channel count on a rank outside the layer's
    group (the group of rank 0; every rank makes it, as torch's new_group asks): the channel
    count's, as torch.nn reports first; None on rank 0."""
    group = dist.new_group([0])
    if rank == 0:
        return None
    try:
        bnlab.SyncBatchNorm(3, process_group=group)(torch.randn(2, 5, 2, 2))
    except ValueError as err:
        return str(err)
    return "no error"


def _gradient_penalty_error(rank: int) -> str | None:
    """The error of a gradient penalty through SyncBatchNorm (create_graph=True, BN's incoming
    gradient a constant, which once_differentiable let through with a wrong second derivative),
    or None where it ran; the group stays aligned either way (it fails before any collective)."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bn = bnlab.SyncBatchNorm(3).double()
    out = (bn(x) * torch.randn(4, 3, generator=gen, dtype=torch.float64)).sum()
    try:
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        (g**2).sum().backward()
    except RuntimeError as err:
        return str(err)
    return None


# -- functions for tests/test_launch.py -----------------------------------------------------------


def report_rank(rank: int, world_size: int, tensor: torch.Tensor) -> dict:
    """Returns what this rank sees: its rank, the world size and the all_reduce of rank·tensor."""
    import signal

    total = tensor * rank
    dist.all_reduce(total)
    return {"rank": rank, "world_size": world_size, "sum": total,
            "ctrl_c_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}


def leave_the_group_first(rank: int, world_size: int) -> int:
    """A rank function that leaves its group itself (as a script's own teardown would), before
    run_local_ranks' rank leaves it again; returns the rank."""
    from bnlab.launch import leave_process_group

    dist.barrier()
    leave_process_group()
    return rank


def fail_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 raises once every rank has joined the group; the others hang (outside any collective,
    so gloo cannot notice).

    The barrier first: raising at once, rank 1 tore its connections down (destroy_process_group)
    while a slower rank 0 could still be in init_process_group's connectFullMesh, which then failed
    with "Connection closed by peer" instead of hanging (one CI run in many, under load).
    """
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        raise KeyError("deliberate failure on rank 1")
    sleep_forever(rank, world_size)


def write_pid_and_sleep(rank: int, world_size: int, folder: str) -> None:
    """Writes this rank's pid to folder/rank{rank}.pid, then never returns on its own."""
    with open(os.path.join(folder, f"rank{rank}.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, f"rank{rank}.pid.tmp"), os.path.join(folder, f"rank{rank}.pid"))
    sleep_forever(rank, world_size)


def sleep_forever(rank: int, world_size: int) -> None:
    """Never returns on its own: for the run's time limit."""
    import time

    while True:
        time.sleep(1)


class _GroupWitness:
    """Writes, when it is collected, whether the default process group still existed then.

    It holds itself (a reference cycle, as DistributedDataParallel and its reducer do), so only the
    garbage collector frees it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.itself = self

    def __del__(self) -> None:
        import torch.distributed as dist

        with open(self.path, "w") as f:
            f.write(str(dist.is_initialized()))


def leave_a_cycle(rank: int, world_size: int, folder: str) -> int:
    """Leaves a _GroupWitness in a cycle, with automatic collection off: only a collection the
    launcher asks for reaches it before the process ends (then, with the group destroyed)."""
    import gc

    gc.disable()
    _GroupWitness(f"{folder}/witness{rank}")
    return rank
