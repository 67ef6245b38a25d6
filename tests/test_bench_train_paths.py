"""benchmarks/train_paths.py: its three paths compute the same training call, and it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_paths  # noqa: E402
from bnlab.backends import cpu_train_entry  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_train_entry() is None, reason="the CPU kernels' extension module did not build")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_paths_time_the_same_work_and_the_switch_comes_back_on(mode, monkeypatch):
    """Each contender of a call runs its layer in the mode asked for, the Python path's switch is
    off inside that contender's calls only and restored after every call."""
    import bnlab._fastpath as fastpath

    seen = []
    real = fastpath.module_forward

    def spy(module, x):
        seen.append((module.training, train_paths.COMPILED_CALLS["on"]))
        return real(module, x)

    monkeypatch.setattr("bnlab.modules.module_forward", spy)
    table = train_paths.calls((6, 4, 3, 3), mode)
    assert set(table) == {"step", "forward", "forward, no_grad"}
    for fns in table.values():
        assert list(fns) == list(train_paths.PATHS)
        for path, fn in fns.items():
            seen.clear()
            fn()
            assert train_paths.COMPILED_CALLS["on"] is True
            expected = [] if path == "torch.nn" else [(mode == "train", path != "bnlab, Python path")]
            assert seen == expected, path


def test_it_runs_and_prints_a_row_per_shape_and_call(capsys, keep_threads):
    train_paths.main(["--shapes", "6,4", "2,3,2,2", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# train_paths.py --mode train --shapes 6,4 2,3,2,2 --threads 1 --rounds 1")
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
