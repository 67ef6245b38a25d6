"""benchmarks/dx_large_spread.py: dx of float32 data with a large spread against the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dx_large_spread  # noqa: E402


def test_prints_every_spread_and_the_portable_dx_stays_near_the_reference(capsys):
    assert dx_large_spread.main(["--backends", "portable,torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["spread", "portable", "torch"] and len(lines) == 1 + len(dx_large_spread.SPREADS)
    for line in lines[1:]:
        spread, portable, theirs = (float(v) for v in line.split())
        assert portable < 2e-7, line  # 4.5e-2 from 1e25 before the forty-ninth session
        if spread >= 1e19:
            assert theirs > 0.5, line  # torch.nn's dx is off entirely there: the control


def test_an_unknown_contender_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        dx_large_spread.main(["--backends", "portable,nope"])
    assert "--backends: expected names from" in capsys.readouterr().err
