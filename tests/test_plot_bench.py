"""benchmarks/plot_bench.py: the speed figure of a bench_bn.py results file draws the file's own
ratios (a bar per case and mode), says which machine ran them, and refuses a file without cases
by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("matplotlib")
import plot_bench  # noqa: E402

from bnlab.lab import speed_plot  # noqa: E402

ENV = {"environment": {"torch": "2.13.0+cpu", "cpu_id": "AuthenticAMD family 25 model 1"}, "command": "bench_bn.py"}


def _case(shape, dims, layout, dtype, mode, vs_torch, of_copy):
    return {"shape": shape, "shape_dims": dims, "layout": layout, "dtype": dtype, "mode": mode, "threads": 2,
            "ratios": {"bnlab_vs_torch": vs_torch, "bnlab_fraction_of_copy_": of_copy}}  # fmt: skip


CASES = [
    _case("conv-56", [32, 64, 56, 56], "nchw", "fp32", "fwd", 5.4, 0.53),
    _case("conv-56", [32, 64, 56, 56], "cl", "bf16", "fwd", 1.5, 0.25),
    _case("mlp-small", [256, 100], "nchw", "fp32", "eval", 1.05, 0.16),
    _case("conv-14", [64, 256, 14, 14], "cl", "fp32", "eval", 1.42, 0.89),
    _case("conv-14", [64, 256, 14, 14], "nchw", "fp32", "fwdbwd", 2.43, 0.29),
]


def _write(tmp_path, rows) -> Path:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_mode_gets_a_row_whose_bars_are_the_files_ratios(tmp_path):
    env, cases = plot_bench.load(_write(tmp_path, [ENV, *CASES]))
    assert env == ENV and cases == CASES
    fig = plot_bench.figure(env, cases)
    axes = fig.get_axes()
    assert len(axes) == 6  # fwd, fwdbwd, eval (MODE_TITLES' order) x (vs torch.nn, fraction of copy_)
    expected = {"fwd": CASES[:2], "fwdbwd": CASES[4:], "eval": CASES[2:4]}
    for row, mode in enumerate(("fwd", "fwdbwd", "eval")):
        speed, of_copy = axes[2 * row], axes[2 * row + 1]
        assert speed.get_title().startswith(speed_plot.MODE_TITLES[mode])
        heights = [bar.get_height() for bar in speed.patches]
        assert heights == [c["ratios"]["bnlab_vs_torch"] for c in expected[mode]]
        assert [bar.get_height() for bar in of_copy.patches] == [c["ratios"]["bnlab_fraction_of_copy_"]
                                                                for c in expected[mode]]  # fmt: skip
        hatched = [bar.get_hatch() == "//" for bar in speed.patches]
        assert hatched == [c["layout"] == "cl" for c in expected[mode]]
        assert speed.get_yscale() == "log"
    assert "family 25 model 1" in fig._suptitle.get_text() and "torch 2.13.0+cpu" in fig._suptitle.get_text()


def test_the_figure_is_written_by_the_command(tmp_path):
    out = tmp_path / "figures" / "speed.png"
    assert plot_bench.main([str(_write(tmp_path, [ENV, *CASES])), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_file_without_cases_or_unreadable_is_refused_by_name(tmp_path):
    path = _write(tmp_path, [ENV])
    with pytest.raises(ValueError, match=f"results: expected bench_bn.py case lines .* in {path}"):
        plot_bench.load(path)
    with pytest.raises(SystemExit):
        plot_bench.main([str(path), "--out", str(tmp_path / "x.png")])
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=f"results: cannot read {missing} "):
        plot_bench.load(missing)


def test_the_log_axis_labels_only_two_three_and_five_between_decades():
    labels = {v: speed_plot._minor_label(v) for v in (2, 3, 4, 5, 7, 20, 30, 40, 0.5, 0.7)}
    assert labels == {2: "2x", 3: "3x", 4: "", 5: "5x", 7: "", 20: "20x", 30: "30x", 40: "", 0.5: "0.5x", 0.7: ""}


def test_several_gpu_files_make_one_figure_named_after_the_gpu(tmp_path):
    gpu_env = {"environment": {"torch": "2.11.0+cu130", "cpu_id": "GenuineIntel", "gpu": "NVIDIA H200"}}
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    cases = [dict(c, device="cuda") for c in CASES]
    out = tmp_path / "gpu.png"
    assert plot_bench.main([str(_write(first, [gpu_env, *cases[:2]])), str(_write(second, [gpu_env, *cases[2:]])),
                            "--out", str(out)]) == 0  # fmt: skip
    fig = plot_bench.figure(gpu_env, cases)
    assert "NVIDIA H200" in fig._suptitle.get_text() and "GenuineIntel" not in fig._suptitle.get_text()
    assert sum(len(ax.patches) for ax in fig.get_axes()) == 2 * len(cases)


def test_the_issues_bandwidth_targets_are_drawn_where_they_apply():
    """CPU: 0.9 on the eval panel only; GPU: 0.85 on every mode's panel."""
    def target_lines(fig):
        return [[line.get_ydata()[0] for line in ax.get_lines()] for ax in fig.get_axes()[1::2]]

    assert target_lines(plot_bench.figure(ENV, CASES)) == [[], [], [0.9]]  # fwd, fwdbwd, eval
    gpu = plot_bench.figure({"environment": {"gpu": "NVIDIA H200"}}, [dict(c, device="cuda") for c in CASES])
    assert target_lines(gpu) == [[0.85], [0.85], [0.85]]
