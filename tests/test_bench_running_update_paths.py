"""benchmarks/running_update_paths.py: the kernels' running averages against the Python update's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import running_update_paths  # noqa: E402
from bnlab.backends import cpu_build  # noqa: E402


@pytest.mark.skipif(cpu_build.load() is None, reason="the CPU kernels did not build")
def test_every_layer_pair_has_the_same_running_averages(capsys):
    assert running_update_paths.main(["--draws", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{kind}: 0 of 20 layers differ" for kind in (
        "float32 input, float32 running averages", "bfloat16 input, float32 running averages",
        "float64 input, float64 running averages")]


def test_no_draws_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        running_update_paths.main(["--draws", "0"])
    assert "argument --draws: expected a positive integer, got '0'" in capsys.readouterr().err
