"""benchmarks/strided_inputs.py: its contenders run the same call on the views it names (the
portable one pinned only while it runs), and it refuses an unknown view naming the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import strided_inputs  # noqa: E402
from bnlab.backends import cpu as cpu_backend  # noqa: E402


def test_contenders_take_their_paths_and_the_pin_is_released(monkeypatch):
    seen = []
    real_portable = strided_inputs.bnlab.backends.get_backend("portable").forward_train

    def spy(*args, **kwargs):
        seen.append("portable")
        return real_portable(*args, **kwargs)

    monkeypatch.setattr(strided_inputs.bnlab.backends.get_backend("portable"), "forward_train", spy)
    view = torch.randn(4, 3, 5, 12)[..., ::2]
    assert cpu_backend.layout_of(view) is None  # the view the script exists for
    table = strided_inputs.calls(view)
    assert set(table) == {"step", "eval"} and all(list(fns) == list(strided_inputs.CONTENDERS) for fns in table.values())
    for call, fns in table.items():
        for name, fn in fns.items():
            seen.clear()
            fn()
            assert strided_inputs.bnlab.backends._PINNED is None
            assert (seen == ["portable"]) == (name == "bnlab, portable" and call == "step"), (call, name, seen)


def test_an_unknown_view_is_refused_naming_the_option():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "strided_inputs.py"), "--views", "slice,diagonal"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "--views" in out.stderr and "'diagonal'" in out.stderr
