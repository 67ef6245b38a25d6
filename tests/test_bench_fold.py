"""benchmarks/bench_fold.py: its models fold as its table says, and it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fold  # noqa: E402

from bnlab.fold import foldable_into_next, foldable_pairs  # noqa: E402


def test_the_dcgan_and_tabular_bns_all_fold_each_the_way_it_can():
    gen = torch.Generator().manual_seed(0)
    dcgan = bench_fold.calibrated(bench_fold.dcgan_generator, torch.randn(4, 100, 1, 1, generator=gen))
    assert [bn for _, bn in foldable_pairs(dcgan)] == ["1", "4", "7", "10"]  # after each ConvTranspose2d
    tabular = bench_fold.calibrated(bench_fold.tabular_mlp, torch.randn(32, 64, generator=gen))
    assert foldable_pairs(tabular) == [("1", "2"), ("4", "5")] and foldable_into_next(tabular) == [("0", "1")]


def test_it_runs_and_reports_every_variant(capsys, keep_threads):
    bench_fold.main(["--models", "tabular", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# bench_fold.py --threads 1 --rounds 1")
    assert lines[1].startswith("tabular") and "unfolded/bnlab.fold" in lines[1]
    notes = dict(part.split(": ", 1) for part in lines[2].strip().split("; "))
    assert notes["unfolded"].startswith("3 BN left") and notes["bnlab.fold"].startswith("0 BN left")
    assert float(notes["bnlab.fold"].split("rel. diff ")[1]) < 1e-12


def test_a_bad_model_name_is_named(capsys):
    with pytest.raises(SystemExit):
        bench_fold.main(["--models", "tabular,vgg"])
    err = capsys.readouterr().err
    assert "--models: expected names from dcgan, tabular, resnet20, got vgg" in err
