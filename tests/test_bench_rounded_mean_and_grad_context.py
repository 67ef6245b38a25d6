"""The scripts behind the thirty-sixth session's two claims run and print what they measure:
portable_rounded_mean.py (the portable input gradient's rounded-mean term) and
eval_grad_context.py (a no_grad around every eval call against one around the sample)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import eval_grad_context  # noqa: E402
import portable_rounded_mean  # noqa: E402
import portable_underflow_check  # noqa: E402


def test_portable_rounded_mean_prints_the_three_forms_against_the_first(capsys, keep_threads):
    assert portable_rounded_mean.main(["--shapes", "mlp-small", "--threads", "1", "--repeats", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# portable_rounded_mean.py --threads 1")
    row = out[1]
    assert row.startswith("(256, 100): no term ") and "(1.000)" in row
    ratios = [float(v) for v in re.findall(r"\(([0-9.]+)\)", row)]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert torch.is_grad_enabled()  # the script's no_grad ends with it


def test_portable_underflow_check_prints_both_forms_against_the_first(capsys, keep_threads):
    argv = ["--shapes", "mlp-small", "--threads", "1", "--repeats", "2", "--rounds", "1"]
    assert portable_underflow_check.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# portable_underflow_check.py --threads 1")
    assert out[1].startswith("(256, 100): no check ") and "(1.000)" in out[1] and "checked (eager CPU) " in out[1]
    assert torch.is_grad_enabled()


def test_eval_grad_context_prints_every_contender_and_both_fractions(capsys, keep_threads):
    argv = ["--shapes", "mlp-small", "--threads", "1", "--rounds", "2", "--min-sample", "0.001"]
    assert eval_grad_context.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("empty no_grad", "bnlab, no_grad per call", "torch, no_grad per sample", "copy_"):
        assert f"{name} " in out
    assert re.search(r"fraction of copy_: no_grad per call [0-9.]+, per sample [0-9.]+", out)


@pytest.mark.parametrize("script", [portable_rounded_mean, portable_underflow_check, eval_grad_context])
def test_an_unknown_shape_is_refused_naming_the_option(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--shapes", "conv-99"])
    assert "--shapes: expected names from" in capsys.readouterr().err
