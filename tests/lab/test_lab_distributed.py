"""Lab runs with several processes: `bnlab run --nproc N`, torchrun-style launches, --sync-bn, resume, failures.

Every launch has timeouts: the ranks' collectives (--timeout), run_local_ranks' stop of the
other ranks after a failure, and a join limit on the torchrun-style processes; no test can hang.
Oracles: the same experiment run in one process on the same global batches (conv, --quick), and
single-process training of lab models in float64 (DDP + SyncBN must equal it to 1e-9).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys

import pytest
import torch

import bnlab.lab.runner as runner
from bnlab.lab.cli import main
from bnlab.lab.train import tensor_batches
from bnlab.launch import run_local_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the ranks import lab_rank_workers too
import lab_rank_workers as workers  # noqa: E402

CONV = ["run", "conv", "--quick", "--timeout", "60"]


def _rows(folder):
    return json.loads((folder / "summary.json").read_text())["rows"]


def _test_losses(folder, norm):
    """{step: test loss} of one conv network, from metrics.jsonl."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["test_loss"] for m in records if m["norm"] == norm}


def _noisy(x, gen):  # an augmentation that draws from the generator, as random crops do
    return x + torch.rand(x.shape, generator=gen)


@pytest.mark.parametrize("transform", [None, _noisy])
def test_rank_shards_concatenate_to_the_one_process_batch(transform):
    x, y = torch.arange(60.0).view(30, 2), torch.arange(30)
    whole = tensor_batches(x, y, 8, torch.Generator().manual_seed(1), transform=transform)
    shards = [tensor_batches(x, y, 8, torch.Generator().manual_seed(1), transform=transform, shard=(r, 4)) for r in range(4)]
    for _ in range(6):  # across epoch boundaries (3 batches of 8 per epoch of 30)
        xb, yb = next(whole)
        parts = [next(s) for s in shards]
        assert all(len(p[1]) == 2 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), xb) and torch.equal(torch.cat([p[1] for p in parts]), yb)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 6, "shard": (0, 4)}, "batch_size: expected a multiple of the 4 processes"),
    ({"batch_size": 8, "shard": (4, 4)}, "shard: expected (rank, world_size)"),
])
def test_bad_shards_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        next(tensor_batches(torch.zeros(10, 2), torch.zeros(10), generator=torch.Generator(), **kwargs))


@pytest.fixture(scope="module")
def conv_runs(tmp_path_factory):
    """conv --quick in one process, and with 2 processes (local BN, SyncBN); ranks > 0 may not write."""
    root = tmp_path_factory.mktemp("dist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_rank_main", workers.guarded_rank_main)
        mp.delenv(workers.FAIL_ENV, raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main([*CONV, "--out", str(root / "single")]) == 0
            assert main([*CONV, "--nproc", "2", "--out", str(root / "local")]) == 0
            assert main([*CONV, "--nproc", "2", "--sync-bn", "--out", str(root / "sync")]) == 0
        finally:
            torch.set_num_threads(threads)
    return root


def test_nproc_run_writes_one_folder_from_rank_zero(conv_runs):
    for name, sync in (("local", False), ("sync", True)):
        folder = conv_runs / name
        config = json.loads((folder / "config.json").read_text())
        assert config["world_size"] == 2 and config["sync_bn"] is sync
        assert sorted(p.name for p in (folder / "units").iterdir()) == sorted(
            f"{n},seed=0.json" for n in ("channel", "activation", "none"))
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["complete"] and len(summary["rows"]) == 3  # one row per network, not one per rank
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3 * 3  # evaluations at steps 0, 10, 20
        report = (folder / "report.md").read_text()
        assert "2 processes (DistributedDataParallel over gloo" in report
        assert ("SyncBatchNorm" in report) is sync
        assert (folder / "conv.png").stat().st_size > 10_000


def test_sync_bn_matches_one_process_and_local_bn_does_not(conv_runs):
    for norm in ("channel", "activation"):
        single = _test_losses(conv_runs / "single", norm)
        sync, local = _test_losses(conv_runs / "sync", norm), _test_losses(conv_runs / "local", norm)
        assert sync[0] == local[0] == single[0]  # the same initial network in all three runs
        # After 10 steps: SyncBN differs from one process by float32 rounding (amplified by training;
        # exact in float64, see below), local BN by the statistics of half the batch.
        sync_gap, local_gap = (abs(run[10] - single[10]) / single[10] for run in (sync, local))
        assert sync_gap < 5e-3 and local_gap > max(2e-2, 10 * sync_gap), (norm, sync_gap, local_gap)
    # Without BN there is nothing to synchronise: DDP over 2 processes is the one-process run.
    for name in ("local", "sync"):
        plain = _test_losses(conv_runs / name, "none")
        single = _test_losses(conv_runs / "single", "none")
        assert all(abs(plain[s] - single[s]) < 1e-4 * single[s] for s in single)


def test_ddp_sync_bn_training_equals_one_process_float64():
    cases = [("mlp", True), ("cnn", True), ("cnn-activation", True), ("mlp", False)]
    results = run_local_ranks(workers.train_lab_model, 2, (cases,), timeout_s=240, collective_timeout_s=60)
    for kind in ("mlp", "cnn", "cnn-activation"):
        oracle = workers.oracle_train(kind)
        for rank, result in enumerate(results):
            got = result[(kind, True)]
            assert got["bn_types"] == ["SyncBatchNorm"]
            assert len(got["losses"]) == workers.ORACLE_STEPS
            assert got["losses"] == pytest.approx(oracle["losses"], rel=1e-9, abs=1e-12)  # global batch loss
            for key, want in oracle["state"].items():  # weights, biases, running statistics
                torch.testing.assert_close(got["state"][key], want, rtol=1e-9, atol=1e-12, msg=f"{kind} {key} rank {rank}")
    # Local BN under DDP normalizes each half batch alone: measurably not the one-process network.
    local, oracle = results[0][("mlp", False)], workers.oracle_train("mlp")
    assert max(abs(a - b) for a, b in zip(local["losses"], oracle["losses"])) > 1e-3


def test_failing_rank_ends_the_run_and_resume_finishes_it(conv_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_rank_main", workers.guarded_rank_main)
    monkeypatch.setenv(workers.FAIL_ENV, json.dumps({"ranks": [1], "unit": "activation,seed=0", "how": "raise"}))
    out = tmp_path / "run"
    assert main([*CONV, "--nproc", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the distributed run failed" in err and "--resume" in err
    assert "rank 1: RuntimeError" in err and "deliberate failure on rank 1" in err
    assert [p.name for p in (out / "units").iterdir()] == ["channel,seed=0.json"]  # the finished unit is kept
    assert main([*CONV, "--resume", "--nproc", "3", "--out", str(out)]) == 2  # another world size: refused
    assert "world_size: stored 2, given 3" in capsys.readouterr().err
    monkeypatch.delenv(workers.FAIL_ENV)
    assert main([*CONV, "--resume", "--out", str(out)]) == 0  # 2 processes again, as stored
    assert _rows(out) == _rows(conv_runs / "local")  # resumed = uninterrupted, number for number
    assert "Partial run" not in (out / "report.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_style(argv, tmp_path, world_size=2, wait_for=(0, 1), join_s=120):
    """Start ``bnlab <argv>`` in world_size processes as torchrun would (but with no agent to stop them).

    Waits up to ``join_s`` seconds for the ranks ``wait_for``, then kills whatever still runs.
    Returns (each rank's result or None, the processes).
    """
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    tmp_path = tmp_path / f"launch-{port}"  # each launch its own files (results, start-up handshake)
    tmp_path.mkdir()
    paths = [tmp_path / f"rank{r}.json" for r in range(world_size)]
    procs = [context.Process(target=workers.torchrun_style_rank, args=(r, world_size, port, argv, str(paths[r])))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        for rank in wait_for:
            procs[rank].join(join_s)
        return [json.loads(path.read_text()) if path.exists() else None for path in paths], procs
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_torchrun_style_launch_writes_the_nproc_run(conv_runs, tmp_path, monkeypatch):
    monkeypatch.delenv(workers.FAIL_ENV, raising=False)
    out = tmp_path / "run"
    results, _ = _torchrun_style([*CONV, "--out", str(out)], tmp_path)
    assert results == [{"code": 0}, {"code": 0}]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert _rows(out) == _rows(conv_runs / "local")  # the same run as `--nproc 2`
    # Rank 0 alone finds that --out holds a run; every rank stops with its error, none waits for rank 0.
    results, _ = _torchrun_style([*CONV, "--out", str(out)], tmp_path)
    assert results == [{"code": 2}, {"code": 2}]


def test_sync_bn_needs_a_network_to_convert():
    from bnlab.lab.world import SINGLE, parallel

    with pytest.raises(ValueError, match="model: expected a network containing BN layers"):
        parallel(torch.nn.BatchNorm1d(3), SINGLE, sync_bn=True)


def test_torchrun_style_rank_that_hangs_makes_the_others_fail_by_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv(workers.FAIL_ENV, json.dumps({"ranks": [1], "unit": "channel,seed=0", "how": "hang"}))
    results, procs = _torchrun_style(["run", "conv", "--quick", "--timeout", "5", "--out", str(tmp_path / "r")],
                                     tmp_path, wait_for=(0,), join_s=90)
    assert not procs[0].is_alive(), "rank 0 kept waiting for the silent rank"
    assert results[0]["code"] is None and "RuntimeError: rank 0 of 2" in results[0]["error"]
    assert results[1] is None  # still asleep when the test stopped it
    assert not (tmp_path / "r" / "units").exists() or not list((tmp_path / "r" / "units").iterdir())


@pytest.mark.parametrize("argv,message", [
    (["run", "init-sweep", "--quick", "--nproc", "2"], "--nproc: init-sweep runs in one process only"),
    (["run", "conv", "--quick", "--sync-bn"], "--sync-bn: expected a run with several processes"),
    (["run", "conv", "--quick", "--nproc", "0"], "--nproc: expected an integer >= 1"),
    (["run", "conv", "--quick", "--nproc", "2", "--timeout", "0"], "--timeout: expected a positive"),
    (["run", "small-batch-sync", "--quick", "--nproc", "1"], "--nproc: small-batch-sync compares"),
    (["run", "small-batch-sync", "--quick", "--sync-bn"], "--sync-bn: small-batch-sync trains"),
    (["run", "all", "--quick", "--nproc", "2"], "--nproc: `run all`"),
])
def test_bad_distributed_options_name_the_option(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
