"""benchmarks/train_paths.py: its four paths compute the same training call, and it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_paths  # noqa: E402

import bnlab  # noqa: E402
from bnlab.backends import cpu_train_entry  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_train_entry() is None, reason="the CPU kernels' extension module did not build")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_paths_time_the_same_work_and_the_switch_comes_back_on(mode, monkeypatch):
    """Each contender of a call runs its layer in the mode asked for: bnlab as shipped through the
    compiled layer call, the nn.Module.__call__ route through module_forward with the compiled
    calls on, the Python path with them off (inside that contender's calls only, restored after
    every call)."""
    import bnlab._fastpath as fastpath

    seen = []
    with torch.no_grad():  # the layer call's stand-in puts the compiled call in the slot
        bnlab.BatchNorm1d(2).eval()(torch.randn(3, 2))
    real, real_layer_call = fastpath.module_forward, fastpath.LAYER_CALL["call"]

    def spy(module, x):
        seen.append((module.training, train_paths.COMPILED_CALLS["on"]))
        return real(module, x)

    def layer_call_spy(module, x):
        y = real_layer_call(module, x)
        seen.append(("layer call", module.training, "taken" if isinstance(y, torch.Tensor) else y))
        return y

    monkeypatch.setattr("bnlab.modules.module_forward", spy)
    monkeypatch.setitem(fastpath.LAYER_CALL, "call", layer_call_spy)
    table = train_paths.calls((6, 4, 3, 3), mode)
    assert set(table) == {"step", "forward", "forward, no_grad"}
    for fns in table.values():
        assert list(fns) == list(train_paths.PATHS)
        for path, fn in fns.items():
            seen.clear()
            fn()
            assert train_paths.COMPILED_CALLS["on"] is True
            training = mode == "train"
            expected = {
                "bnlab": [("layer call", training, "taken")],
                "bnlab via Module.__call__": [(training, True)],
                "bnlab, Python path": [("layer call", training, NotImplemented), (training, False)],
                "torch.nn": [],
            }[path]
            assert seen == expected, path


def test_it_runs_and_prints_a_row_per_shape_and_call(capsys, keep_threads):
    train_paths.main(["--shapes", "6,4", "2,3,2,2", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# train_paths.py --mode train --shapes 6,4 2,3,2,2 --threads 1 --rounds 1")
    rows = lines[2:]
    assert len(rows) == 6 and rows[0].startswith("(6, 4)") and "no_grad" in rows[2]
    assert all(float(v) > 0 for row in rows for v in row.split()[-7:])


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "3,4,5"], "--shapes: expected N,C or N,C,H,W of positive sizes, got '3,4,5'"),
    (["--min-sample", "-1"], "--min-sample: expected seconds >= 0, got -1.0"),
])  # fmt: skip
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_paths.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
