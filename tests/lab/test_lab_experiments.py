"""The quick version of every experiment runs, writing the figures, summary rows and report it must.

One `bnlab run all --quick` per test session (about 20 s); each test then checks one experiment's
folder. These tests check outputs, not accuracy: the full versions' numbers are in docs/experiments.md.
"""

from __future__ import annotations

import csv
import json
import struct

import pytest
import torch

from bnlab.lab.cli import main
from bnlab.lab.experiments import registry

# name -> (figures, number of rows for one seed, keys every row must have, extra tables and their sizes)
EXPECTED = {
    "init-sweep": (["init_sweep_final.png", "init_sweep_grid.png"], 32,
                   {"weight_init_std", "batchnorm", "seed", "train_acc", "test_acc", "diverged"}, {}),
    "lr-sweep": (["lr_sweep_final.png", "lr_sweep_curves.png"], 24,
                 {"lr", "batchnorm", "seed", "test_acc", "diverged", "steps_to_90"}, {}),
    "activations": (["activations.png"], 2, {"batchnorm", "seed", "test_acc", "median_drift", "saturated_frac"}, {}),
    "inference": (["inference.png"], 2, {"batchnorm", "seed", "train_acc", "test_acc"},
                  {"batch_stats": 11, "running_stats": 7}),
    "conv": (["conv.png"], 3, {"norm", "seed", "test_acc", "train_acc", "bn_params"}, {}),
    "resnet": (["resnet.png"], 2, {"batchnorm", "seed", "test_acc", "test_error", "diverged"}, {}),
    "regularization": (["regularization.png"], 12,
                       {"batchnorm", "dropout", "lr", "seed", "train_acc", "test_acc", "gap", "test_loss"}, {}),
    "batch-size": (["batch_size.png", "batch_size_why.png"], 13,
                   {"batch_size", "norm", "seed", "train_acc", "test_acc", "test_acc_batch_stats", "diverged"}, {"diagnose": 21}),
    "small-batch-sync": (["small_batch_sync.png"], 6, {"mode", "batch", "global_batch", "seed", "test_acc"},
                         {"early_loss": 60}),
    "speed": (["speed.png"], 8, {"case", "shape", "layout", "dtype", "mode", "threads", "machine", "bnlab_ms",
                                 "torch_ms", "copy_ms", "speedup", "fraction_of_copy"}, {"models": 2}),
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "all"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", "all", "--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_registered_experiment_is_checked():
    assert set(registry()) == set(EXPECTED)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_run_writes_figures_rows_and_report(quick_runs, name):
    figures, n_rows, keys, tables = EXPECTED[name]
    folder = quick_runs / name
    config = json.loads((folder / "config.json").read_text())
    assert config["experiment"] == name and config["quick"] and config["seeds"] == [0]
    assert config["versions"]["torch"] and "git_commit" in config
    for fig in figures:
        width, height = _png_size(folder / fig)
        assert 400 <= width <= 2000 and 250 <= height <= 1400, (fig, width, height)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["complete"] and len(summary["rows"]) == n_rows
    for row in summary["rows"]:
        assert keys <= set(row), keys - set(row)
        assert all(not isinstance(v, (dict, list)) for v in row.values()), "rows must be flat records"
    for table, size in tables.items():
        assert len(summary["tables"][table]) == size
    with open(folder / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == n_rows
    report = (folder / "report.md").read_text()
    assert "## What was measured" in report and "Partial run" not in report
    for fig in figures:
        assert f"]({fig})" in report


def test_quick_batch_size_report_counts_its_one_epoch_in_the_singular(quick_runs):
    report = (quick_runs / "batch-size" / "report.md").read_text()
    assert ", 1 epoch but at least " in report and "1 epochs" not in report


def test_small_batch_sync_quick_run_separates_local_bn_from_sync_bn(quick_runs):
    """2 processes: SyncBN reproduces one process on the global batch (float32 rounding), local BN does not."""
    summary = json.loads((quick_runs / "small-batch-sync" / "summary.json").read_text())
    assert {r["world_size"] for r in summary["rows"]} == {2}
    loss = {(r["mode"], r["batch"], r["step"]): r["loss"] for r in summary["tables"]["early_loss"]}
    for (mode, batch, step), value in loss.items():
        single = loss[("single", batch, step)]
        if mode == "sync":
            assert abs(value - single) < 1e-3 * single, (batch, step, value, single)
        if mode == "local" and step == 1:  # BN over 2 or 8 images instead of 4 or 16: another loss at once
            assert abs(value - single) > 1e-3 * single, (batch, value, single)
