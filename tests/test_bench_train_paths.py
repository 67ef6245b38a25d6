"""benchmarks/train_paths.py: its three paths compute the same training call, and it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_paths  # noqa: E402
from bnlab.backends import cpu_train_entry  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_train_entry() is None, reason="the CPU kernels' extension module did not build")


def test_the_paths_time_the_same_work_and_the_switch_comes_back_on():
    """Each contender of a call runs the same layer state on the same input, the Python path's
    switch is restored after every call, and every path counts its batches."""
    table = train_paths.calls((6, 4, 3, 3))
    assert set(table) == {"step", "forward", "forward, no_grad"}
    for fns in table.values():
        assert list(fns) == list(train_paths.PATHS)
        for fn in fns.values():
            fn()
            assert train_paths.COMPILED_CALLS["on"] is True


def test_it_runs_and_prints_a_row_per_shape_and_call(capsys):
    threads = torch.get_num_threads()
    try:
        train_paths.main(["--shapes", "6,4", "2,3,2,2", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# train_paths.py --shapes 6,4 2,3,2,2 --threads 1 --rounds 1")
    rows = lines[2:]
    assert len(rows) == 6 and rows[0].startswith("(6, 4)") and "no_grad" in rows[2]
    assert all(float(v) > 0 for row in rows for v in row.split()[-5:])


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "3,4,5"], "--shapes: expected N,C or N,C,H,W of positive sizes, got '3,4,5'"),
    (["--min-sample", "-1"], "--min-sample: expected seconds >= 0, got -1.0"),
])  # fmt: skip
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_paths.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
