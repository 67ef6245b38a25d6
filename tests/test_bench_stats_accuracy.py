"""benchmarks/stats_accuracy_16bit.py: its errors are those of the kernels' statistics (an exact
input gives none), and a malformed shape is refused naming the option."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import stats_accuracy_16bit  # noqa: E402


def test_errors_stay_within_the_kernels_bound_and_a_wrong_statistic_shows(monkeypatch):
    e_mean, e_var, e_torch = stats_accuracy_16bit.errors((124, 40, 6), torch.bfloat16)
    assert e_mean < 2e-6 and e_var < 2e-6 and e_torch < 1e-6
    backend = stats_accuracy_16bit.get_backend("cpu")
    real = backend.forward_train

    def off(x, *args):  # a variance 1e-4 off must read as such
        y, moments, invstd = real(x, *args)
        return y, moments._replace(m2=moments.m2 * (1 + 1e-4)), invstd

    monkeypatch.setattr(backend, "forward_train", off)
    assert stats_accuracy_16bit.errors((124, 40, 6), torch.bfloat16)[1] > 5e-5


@pytest.mark.parametrize("text", ["124", "124,0,6", "a,b"])
def test_a_malformed_shape_is_refused_naming_the_option(text, capsys):
    with pytest.raises(SystemExit) as info:
        stats_accuracy_16bit.main(["--shapes", text])
    assert info.value.code == 2 and "--shapes" in capsys.readouterr().err
