"""Run folders: atomic writes, unit results, summary and CSV, strict JSON."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from bnlab.lab.runs import RunFolder, atomic_write_text, clean_json


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644


def test_clean_json_replaces_non_finite_floats():
    assert clean_json({"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": True}) == \
        {"a": None, "b": [1.0, None, [2, None]], "c": True}


def test_unit_results_make_summary_csv_and_metrics(tmp_path):
    folder = RunFolder.create(tmp_path / "run", {"experiment": "x", "units": ["a", "b"]})
    with pytest.raises(FileExistsError, match="--resume"):
        RunFolder.create(tmp_path / "run", {"experiment": "x", "units": []})
    folder.save_unit("b", {"rows": [{"seed": 1, "acc": 0.5, "extra": "z"}], "metrics": [{"step": 1, "loss": math.nan}],
                           "wall_s": 2.0})
    summary = folder.write_summary()
    assert not summary["complete"] and summary["units_done"] == ["b"]
    folder.save_unit("a", {"rows": [{"seed": 0, "acc": 0.25}], "tables": {"t": [{"k": 1}]}, "wall_s": 1.0})
    summary = folder.write_summary()
    assert summary["complete"] and summary["wall_s"] == 3.0
    assert [r["seed"] for r in summary["rows"]] == [0, 1]  # in the configuration's unit order
    with open(folder.path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"seed": "0", "acc": "0.25", "extra": ""}, {"seed": "1", "acc": "0.5", "extra": "z"}]
    assert json.loads((folder.path / "summary.json").read_text())["tables"] == {"t": [{"k": 1}]}
    assert (folder.path / "table_t.csv").read_text().splitlines() == ["k", "1"]
    lines = (folder.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": None}]


def test_save_unit_requires_rows(tmp_path):
    folder = RunFolder.create(tmp_path / "run", {"experiment": "x", "units": ["a"]})
    with pytest.raises(ValueError, match="rows"):
        folder.save_unit("a", {"metrics": []})
    with pytest.raises(FileNotFoundError, match="config.json"):
        RunFolder.open(tmp_path / "nothing")


def test_a_damaged_file_is_named(tmp_path):
    folder = RunFolder.create(tmp_path / "r", {"experiment": "x", "units": ["a"]})
    folder.save_unit("a", {"rows": [{"v": 1}]})
    folder.unit_file("a").write_text('{"unit": "a", "rows": [')
    with pytest.raises(ValueError, match=r"units/a\.json: expected the JSON bnlab wrote, got a damaged file .*"
                                         r"delete it to run that unit again with --resume"):
        folder.rows()
    (tmp_path / "r" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: expected the JSON bnlab wrote, got a damaged file"):
        folder.config
