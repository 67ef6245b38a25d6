"""benchmarks/dx_accuracy.py: its errors are those of the kernels' input gradient (a wrong dx
shows), the constant-channel data is exact where the kernels are, and bad options are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import dx_accuracy  # noqa: E402


@pytest.mark.parametrize("kind", dx_accuracy.KINDS)
def test_errors_stay_within_float32_rounding_and_a_wrong_dx_shows(kind, monkeypatch):
    ours, theirs = dx_accuracy.errors((64, 24, 2, 2), torch.float32, kind)
    # A few units of float32 rounding for every kind, dy-offset included (8.2e-6 there before the
    # training backward summed (dy - g)·x̂); torch.nn to 4e-3 at offset.
    assert ours < 3e-7 and theirs < 1e-2
    backend = dx_accuracy.get_backend("cpu")
    real = backend.backward

    def off(dy, x, mean, invstd, weight, *rest, **options):  # dx off by 1e-3·γ·invstd·dy must read as such
        dx, dw, db = real(dy, x, mean, invstd, weight, *rest, **options)  # (additive: mean-loss's exact dx is 0)
        kk = (weight.double() * invstd.double()).reshape((1, -1) + (1,) * (dy.dim() - 2))
        return dx + (1e-3 * kk * dy.double()).to(dx.dtype), dw, db

    monkeypatch.setattr(backend, "backward", off)
    assert dx_accuracy.errors((64, 24, 2, 2), torch.float32, kind)[0] > 5e-5


def test_constant_channels_are_held_in_both_x_and_dy():
    x, dy = dx_accuracy.data((6, 4, 3), torch.float32, "constant")
    assert torch.equal(x[:, 0], torch.full_like(x[:, 0], 0.75)) and torch.equal(dy[:, 2], torch.full_like(dy[:, 2], -2.5))
    assert x[:, 1].std() > 0.1 and dy[:, 3].std() > 0.1


@pytest.mark.parametrize("argv,option", [(["--shapes", "4,0"], "--shapes"), (["--dtypes", "fp8"], "--dtypes"),
                                         (["--threads", "0"], "--threads")])  # fmt: skip
def test_bad_options_are_refused_naming_them(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        dx_accuracy.main(argv)
    assert info.value.code == 2 and option in capsys.readouterr().err
