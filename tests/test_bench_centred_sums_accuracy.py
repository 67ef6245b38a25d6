"""benchmarks/centred_sums_accuracy.py: its errors are those of the backend's Σdy·x̂ (a wrong sum
shows), its kinds of data are what they say, and bad options are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import centred_sums_accuracy as bench  # noqa: E402


def test_centred_errors_stay_at_float32_rounding_and_a_wrong_sum_shows(monkeypatch):
    centred, whole = bench.errors((64, 24, 2, 2), torch.float32, "normal", "dy-offset")
    assert centred < 1e-6 < 1e-5 < whole  # measured 1e-7 and 2e-4
    backend = bench.get_backend("cpu")
    real = backend.grad_sums

    def off(dy, x, mean, invstd, *rest):  # Σdy·x̂ off by 1e-4 of its terms must read as such
        sums = real(dy, x, mean, invstd, *rest)
        return sums[0], sums[1] + 1e-3 * sums[1].abs().max()

    monkeypatch.setattr(backend, "grad_sums", off)
    assert bench.errors((64, 24, 2, 2), torch.float32, "normal", "dy-offset")[0] > 1e-4


def test_kinds_of_data_hold_what_they_say():
    x, dy = bench.data((40, 3, 5), torch.float64, "offset", "per-sample")
    assert abs(float(x.mean()) - 1e3) < 0.01 and float(x.std()) < 0.02
    within = dy - dy.mean((1, 2), keepdim=True)  # each sample's offset taken off
    assert float(within.std()) < 0.02 < float(dy.mean((1, 2)).std())
    _, dy = bench.data((40, 3, 5), torch.float64, "normal", "dy-offset")
    assert abs(float(dy.mean()) - 8) < 0.01


def test_ranks_split_the_batch_and_their_shares_are_measured():
    assert bench.rank_sizes(16, 4) == [2, 0, 6, 8] and bench.rank_sizes(7, 2) == [2, 5]
    centred, whole = bench.errors((64, 24, 2, 2), torch.float32, "normal", "dy-offset", ranks=4)
    assert centred < 1e-6 < 1e-5 < whole  # the ranks' shares, summed about their own means and whole


@pytest.mark.parametrize(
    "argv,option",
    [(["--shapes", "4,0"], "--shapes"), (["--threads", "0"], "--threads"), (["--ranks", "0"], "--ranks"),
     (["--ranks", "2", "--whole-only"], "--ranks"), (["--ranks", "5", "--shapes", "4,3"], "--ranks")],
)  # fmt: skip
def test_bad_options_are_refused_naming_them(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2 and option in capsys.readouterr().err
