"""benchmarks/eval_cache_ab.py: a child times every shape's three calls; the parent reads the
child's last line and prints one row per shape with the cache off and on; bad counts are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_cache_ab  # noqa: E402


def test_the_child_times_each_shape_five_ways(monkeypatch, keep_threads):
    monkeypatch.setattr(eval_cache_ab, "SHAPES", ((2, 64), (1, 8, 3, 3)))
    out = eval_cache_ab.child(threads=1, samples=1, reps=2)
    assert list(out) == ["2,64", "1,8,3,3"]
    for row in out.values():
        assert set(row) == {"bnlab", "torch.nn", "copy_", "bnlab graph", "torch.nn graph"}
        assert all(v > 0 for v in row.values())


def test_the_parent_prints_a_row_per_shape_from_the_children(monkeypatch, capsys):
    seen = []

    def fake_child(cache_on, args):
        seen.append(cache_on)
        us = 2.0 if cache_on else 8.0
        row = {"bnlab": us, "torch.nn": 16.0, "copy_": 1.0, "bnlab graph": 2 * us, "torch.nn graph": 32.0}
        return {"2,8192": row}

    monkeypatch.setattr(eval_cache_ab, "run_child", fake_child)
    eval_cache_ab.main(["--rounds", "2"])
    assert seen == [True, False, False, True]  # the order alternates
    lines = capsys.readouterr().out.splitlines()
    plain, graph = lines[3].split(), lines[-1].split()
    assert plain[0] == "(2,8192)" and plain[1:4] == ["8.00", "2.00", "0.25"] and plain[-1] == "8.00x"
    assert graph[0] == "(2,8192)" and graph[1:4] == ["16.00", "4.00", "0.25"] and graph[-1] == "8.00x"


def test_a_count_of_zero_is_refused(capsys):
    with pytest.raises(SystemExit):
        eval_cache_ab.main(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err
