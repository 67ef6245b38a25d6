"""benchmarks/sync_sums_cost.py: its contenders compute what they are named for, it prints a row
per shape, and bad options are refused naming them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import sync_sums_cost as bench  # noqa: E402


def test_contenders_are_the_three_forms_of_the_same_sums():
    calls = bench.contenders((64, 5, 3))
    whole, centred, local = (calls[name]() for name in ("whole", "centred", "local"))
    # local_grad_sums is the group's Σdy·x̂: the whole sums' value, to float32 rounding of the
    # terms; the centred kernel call alone is about the rank's own mean, a different sum
    torch.testing.assert_close(local[1], whole[1], rtol=0, atol=1e-3)
    torch.testing.assert_close(local[0], whole[0], rtol=1e-12, atol=1e-9)
    assert (centred[1] - whole[1]).abs().max() > 1e-2


def test_prints_a_row_per_shape(capsys, keep_threads):
    bench.main(["--shapes", "32,4", "8,3,2,2", "--rounds", "2", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("(")]
    assert len(rows) == 2 and all(len(r.split()) >= 5 for r in rows)


@pytest.mark.parametrize("argv,option", [(["--rounds", "0"], "--rounds"), (["--reps", "x"], "--reps"),
                                         (["--shapes", "4"], "--shapes")])  # fmt: skip
def test_bad_options_are_refused_naming_them(argv, option, capsys, keep_threads):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2 and option in capsys.readouterr().err
