"""Code that runs inside the processes of the distributed lab tests (tests/lab/test_lab_distributed.py).

- :func:`guarded_rank_main` stands in for ``bnlab.lab.runner._rank_main`` (the tests monkeypatch
  it in the parent; the ranks import it from here): it makes any write to the run folder from
  a rank other than 0 an error, and injects the failure described by $BNLAB_TEST_FAIL.
- :func:`torchrun_style_rank` is one process of a torchrun-like launch: RANK, WORLD_SIZE,
  MASTER_ADDR/PORT in the environment, then ``bnlab.lab.cli.main(argv)``, as torchrun's workers do.
- :func:`train_lab_model` trains a lab model for a few steps under DDP (bnlab.lab.world.parallel,
  sharded tensor_batches, train_loop) and returns its state, for the float64 oracle comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

FAIL_ENV = "BNLAB_TEST_FAIL"


def _refuse_writes(rank: int) -> None:
    """Make every way the lab writes a run folder raise on this rank."""
    import bnlab.lab.plotting as plotting
    import bnlab.lab.runs as runs

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"rank {rank} wrote {path}: only rank 0 may write the run folder")

    runs.atomic_write_text = refuse  # atomic_write_json, save_unit and write_summary go through it
    plotting.save_figure = refuse


def _inject_failure(rank: int) -> None:
    """Replace the experiment's run_unit so that it fails as $BNLAB_TEST_FAIL says (JSON), on the ranks it names.

    {"ranks": [1], "unit": "activation,seed=0", "how": "raise" | "hang"}
    """
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    spec = json.loads(spec)
    if rank not in spec["ranks"]:
        return
    import bnlab.lab.runner as runner

    real_get = runner.get

    def get(name):
        exp = real_get(name)

        def run_unit(unit, ctx):
            if unit == spec["unit"]:
                if spec["how"] == "hang":
                    time.sleep(3600)  # alive but silent: only the peers' collective timeout can end the run
                raise RuntimeError(f"deliberate failure on rank {rank} in unit {unit}")
            return exp.run_unit(unit, ctx)

        return dataclasses.replace(exp, run_unit=run_unit)

    runner.get = get


def guarded_rank_main(rank: int, world_size: int, *args) -> None:
    """``bnlab.lab.runner._rank_main`` with writes from ranks > 0 refused and $BNLAB_TEST_FAIL's failure injected."""
    import bnlab.lab.runner as runner

    real_rank_main = runner._rank_main  # the ranks import the runner afresh: this is the real one
    if rank != 0:
        _refuse_writes(rank)
    _inject_failure(rank)
    real_rank_main(rank, world_size, *args)


def _wait_for_peers(folder: str, rank: int, world_size: int, limit_s: float = 120.0) -> None:
    """Wait until every rank has imported bnlab: on a busy machine one import can take seconds longer
    than another, and the group's short test timeout must measure the hang, not the import."""
    open(os.path.join(folder, f"ready{rank}"), "w").close()
    deadline = time.monotonic() + limit_s
    while not all(os.path.exists(os.path.join(folder, f"ready{r}")) for r in range(world_size)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks did not start within {limit_s} s")
        time.sleep(0.05)


def torchrun_style_rank(rank: int, world_size: int, port: int, argv: list[str], result_path: str) -> None:
    """One process of a torchrun-style launch running ``bnlab <argv>``; writes its exit code (or error) as JSON."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if rank != 0:
        _refuse_writes(rank)
    _inject_failure(rank)
    from bnlab.lab.cli import main

    _wait_for_peers(os.path.dirname(result_path), rank, world_size)
    try:
        result = {"code": main(argv)}
    except BaseException as err:  # noqa: BLE001 - reported to the test, which asserts on it
        result = {"code": None, "error": f"{type(err).__name__}: {err}"}
    with open(result_path, "w") as f:
        json.dump(result, f)


# -- the float64 oracle comparison ---------------------------------------------------------------

# A gentle lr: the per-activation CNN at lr 0.1 diverges, and a diverging run amplifies float64 rounding to 1e-9.
ORACLE_BATCH, ORACLE_STEPS, LR = 8, 4, 0.02


def oracle_case(kind: str):
    """(model, x, y) in float64 for one lab model, the same in every process."""
    from bnlab.lab import data
    from bnlab.lab.models import MLP, SmallCNN

    train, _ = data.load("mnist")
    x, y = train.x[:96].double(), train.y[:96]
    x = (x - x.mean()) / x.std()
    torch.manual_seed(7)
    if kind == "mlp":
        return MLP([784, 32, 32, 10], batchnorm=True).double(), x.flatten(1), y
    return SmallCNN("activation" if kind == "cnn-activation" else "channel").double(), x, y


def oracle_train(kind: str, world=None, sync_bn: bool = False) -> dict:
    """Train ``kind`` for ORACLE_STEPS SGD steps on global batches of ORACLE_BATCH; under DDP if ``world`` has > 1 process."""
    from bnlab.lab.train import tensor_batches, train_loop
    from bnlab.lab.world import SINGLE, parallel

    world = world or SINGLE
    model, x, y = oracle_case(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    trained = parallel(model, world, sync_bn=sync_bn)
    batches = tensor_batches(x, y, ORACLE_BATCH, torch.Generator().manual_seed(3), shard=world.shard)
    losses = train_loop(trained, opt, batches, ORACLE_STEPS)
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "bn_types": sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})}


def train_lab_model(rank: int, world_size: int, cases: list[tuple[str, bool]]) -> dict:
    """Every (kind, sync_bn) case trained under DDP on this rank; results keyed by case."""
    from bnlab.lab.world import World

    torch.set_num_threads(1)
    return {case: oracle_train(case[0], World(rank, world_size), sync_bn=case[1]) for case in cases}
