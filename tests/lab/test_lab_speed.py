"""The lab's speed experiment (`bnlab run speed`): its cases, the arithmetic of its rows, what its
report says, and a resumed run timing only the cases a failed one left.

The timer is replaced by one returning fixed seconds, so the rows' ratios and GB/s can be checked
exactly; nothing here asserts how fast anything runs (tests/lab/test_lab_experiments.py runs the
real quick version).
"""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.lab import speed_timing
from bnlab.lab.cli import main
from bnlab.lab.experiments import get
from bnlab.lab.speed_cases import SHAPES, traffic_bytes

SECONDS = {"bnlab": 1e-3, "torch": 3e-3, "copy": 0.5e-3, "copy_": 0.4e-3, "bnlab folded": 0.8e-3}
EVAL_TORCH_SECONDS = 0.5e-3  # torch.nn "faster" in eval: the report must name those cases
LAYER_CONTENDERS = {"bnlab", "torch", "copy", "copy_"}


#: bnlab's samples over three rounds, as multiples of its median (SECONDS["bnlab"]); the others'
#: samples are the same in every round, so the speed-ups the rounds read are the median's 1, 2 and
#: 0.5 times, whose middle half (inclusive quartiles of 0.5, 1, 2 times) is 0.75-1.5 times
BNLAB_ROUNDS = (1.0, 0.5, 2.0)


def _fixed_timer(calls: list):
    """An interleaved_samples that runs each contender once and returns fixed seconds for three
    rounds; calls gets (contenders, whether gradients were on) per case or network."""
    def timer(fns, device, rounds, min_sample_s):
        assert device == "cpu"
        for fn in fns.values():  # the contenders are built and run; only their clock is fixed
            fn()
        calls.append((set(fns), torch.is_grad_enabled()))
        eval_layer = set(fns) == LAYER_CONTENDERS and not torch.is_grad_enabled()
        median = {name: EVAL_TORCH_SECONDS if name == "torch" and eval_layer else SECONDS[name] for name in fns}
        return {name: [s * k for k in BNLAB_ROUNDS] if name == "bnlab" else [s] * len(BNLAB_ROUNDS)
                for name, s in median.items()}

    return timer


@pytest.fixture
def quick_speed_run(tmp_path, monkeypatch, capsys, keep_threads):
    torch.set_num_threads(1)
    calls: list = []
    monkeypatch.setattr(speed_timing, "interleaved_samples", _fixed_timer(calls))
    out = tmp_path / "speed"
    assert main(["run", "speed", "--quick", "--out", str(out)]) == 0
    return out, calls, capsys.readouterr().out


def test_the_full_version_times_every_shape_layout_dtype_and_mode_of_the_issue():
    exp = get("speed")
    config = {"quick": False, "device": "cpu"}
    config["params"] = exp.params(config)
    units = exp.units(config)
    assert units[-4:] == ["model/resnet20/step", "model/resnet20/inference", "model/mlp/step", "model/mlp/inference"]
    units = units[:-4]
    # 2 MLP shapes in one layout and 3 modes, 4 conv shapes in two layouts and 5 (BatchNormAct2d's two too)
    assert len(units) == len(set(units)) == 2 * 2 * 3 + 4 * 2 * 2 * 5
    assert {u.split("/")[0] for u in units} == {"mlp-small", "mlp-large", "conv-56", "conv-14", "conv-32s", "conv-32l"}
    assert all(len(SHAPES[u.split("/")[0]]) == 4 for u in units if "/cl/" in u or "relu_" in u)
    modes = ("fwd", "fwdbwd", "eval", "relu_fwdbwd", "addrelu_fwdbwd")
    assert {tuple(u.split("/")[2:]) for u in units} == {(d, m) for d in ("fp32", "bf16") for m in modes}


def test_rows_hold_the_ratios_and_bandwidths_of_the_measured_times(quick_speed_run):
    out, calls, printed = quick_speed_run
    rows = json.loads((out / "summary.json").read_text())["rows"]
    units = get("speed").units(json.loads((out / "config.json").read_text()))
    assert [r["case"] for r in rows] + ["model/mlp/step", "model/mlp/inference"] == units
    # eval timed with gradients off, training with them on; then the MLP's step and inference
    assert calls == [(LAYER_CONTENDERS, r["mode"] != "eval") for r in rows] + [
        ({"bnlab", "torch"}, True), ({"bnlab", "torch", "bnlab folded"}, True)]
    for r in rows:
        dims = tuple(int(d) for d in r["dims"].split("x"))
        assert dims == SHAPES[r["shape"]] and r["threads"] == 1 and r["machine"]
        moved = traffic_bytes(dims, torch.float32, r["mode"])
        copied = traffic_bytes(dims, torch.float32, "eval")
        torch_s = EVAL_TORCH_SECONDS if r["mode"] == "eval" else SECONDS["torch"]
        assert r["bnlab_ms"] == 1.0 and r["torch_ms"] == round(torch_s * 1e3, 4) and r["copy_ms"] == 0.4
        assert r["speedup"] == pytest.approx(torch_s / SECONDS["bnlab"])
        quartiles = [r["speedup_q1"], r["speedup_q3"]]
        assert quartiles == pytest.approx([0.75 * r["speedup"], 1.5 * r["speedup"]], abs=1e-3)
        assert r["bnlab_GBps"] == round(moved / 1e-3 / 1e9, 2)
        assert r["fraction_of_copy"] == pytest.approx((moved / 1e-3) / (copied / 0.4e-3), rel=1e-3)
        quartiles = [r["fraction_of_copy_q1"], r["fraction_of_copy_q3"]]
        assert quartiles == pytest.approx([0.75 * r["fraction_of_copy"], 1.5 * r["fraction_of_copy"]], abs=1e-3)
    assert "speed: 8 cases in" in printed  # conv-8's 5 modes, mlp-small's 3


def test_the_report_states_the_speedups_and_names_the_cases_where_torch_was_faster(quick_speed_run):
    out, _, _ = quick_speed_run
    report = (out / "report.md").read_text()
    assert "- **training forward**: bnlab 3.00x torch.nn's speed (geometric mean of 2 cases)" in report
    assert "- **eval**: bnlab 0.50x torch.nn's speed" in report
    assert ("Cases where torch.nn was faster: mlp-small/nchw/fp32/eval (0.50x), conv-8/nchw/fp32/eval (0.50x)."
            in report)
    # forward+backward moves 5N bytes in bnlab's millisecond, the copy 2N in 0.4 ms: 1.00 of its bandwidth
    assert "at 1.00-1.00 of a copy's bandwidth" in report
    # the median speed-up, then the middle half of the rounds' (3 times 0.5, 1, 2: 2.25-4.5)
    assert "| `conv-8/nchw/fp32/fwd` | 128x64x8x8 | 1 | 3 | 3.00x (2.25-4.50) |" in report
    assert "| `conv-8/nchw/fp32/eval` | 128x64x8x8 | 1 | 0.5 | 0.50x (0.38-0.75) |" in report
    # and its fraction of copy_'s bandwidth: 0.4 ms over bnlab's 1 ms, the rounds' middle half 0.3-0.6
    assert next(line for line in report.splitlines() if "`conv-8/nchw/fp32/eval`" in line).endswith(
        "| 0.4 | 0.40 (0.30-0.60) |")
    assert ("A speed-up is read round by round, torch.nn's sample over bnlab's beside it, and given as the median "
            "of the rounds' readings with their middle half in brackets") in report
    assert "](speed.png)" in report and (out / "speed.png").stat().st_size > 0
    # it trains nothing: no seeds, BN implementation or dataset in how the run was made
    assert "seeds" not in report and "data:" not in report and "one record per case" in report
    assert "| MLP 784-100x5-10 | 100 | training step | 1 | 3 | 3.00x (2.25-4.50) | – |" in report
    assert "| MLP 784-100x5-10 | 100 | inference | 1 | 3 | 3.00x (2.25-4.50) | 0.8 |" in report


def test_a_resumed_run_times_only_the_cases_a_failed_run_left(tmp_path, monkeypatch, keep_threads):
    torch.set_num_threads(1)
    calls: list = []
    timer = _fixed_timer(calls)

    def failing_on_the_third(*args):
        if len(calls) == 2:
            raise RuntimeError("killed")
        return timer(*args)

    out = tmp_path / "speed"
    monkeypatch.setattr(speed_timing, "interleaved_samples", failing_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        main(["run", "speed", "--quick", "--out", str(out)])
    assert len(list((out / "units").iterdir())) == 2
    monkeypatch.setattr(speed_timing, "interleaved_samples", timer)
    assert main(["run", "speed", "--resume", "--out", str(out)]) == 0
    assert len(calls) == 10  # 2 before the failure, then the 6 cases and 2 network calls left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and len(summary["rows"]) == 8 and len(summary["tables"]["models"]) == 2


def test_shapes_replace_the_benchmark_s_and_a_resume_keeps_them(tmp_path, monkeypatch, keep_threads):
    torch.set_num_threads(1)
    calls: list = []
    monkeypatch.setattr(speed_timing, "interleaved_samples", _fixed_timer(calls))
    out = tmp_path / "mine"
    assert main(["run", "speed", "--shapes", "8,6", "4,6,5,5", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["shapes"] == [[8, 6], [4, 6, 5, 5]]
    assert config["params"]["shapes"] == {"8x6": [8, 6], "4x6x5x5": [4, 6, 5, 5]}
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert "models" not in summary["tables"]  # the user's layers only
    # the full version's layouts and dtypes: channels-last for the 4-d shape only
    assert sorted({(r["dims"], r["layout"]) for r in rows}) == [("4x6x5x5", "cl"), ("4x6x5x5", "nchw"), ("8x6", "nchw")]
    assert len(rows) == 3 * 2 * 3 + 2 * 2 * 2  # and BatchNormAct2d's two modes for the 4-d shape (2 layouts, 2 dtypes)
    assert main(["run", "speed", "--resume", "--out", str(out)]) == 0  # nothing left: nothing timed again
    assert len(calls) == len(rows)


@pytest.mark.parametrize("argv,message", [
    (["run", "speed", "--shapes", "8"], "--shapes: expected 2 to 5 comma-separated positive sizes"),
    (["run", "speed", "--shapes", "8,0"], "--shapes: expected 2 to 5 comma-separated positive sizes"),
    # a leading minus, which argparse took for an option ("expected at least one argument")
    (["run", "speed", "--shapes", "-1,3"], "--shapes: expected 2 to 5 comma-separated positive sizes"),
    (["run", "speed", "--shapes", "4,3", "-4,3,2,2"], "got '-4,3,2,2'"),
    (["run", "speed", "--shapes", "4,6,x"], "--shapes: expected 2 to 5 comma-separated positive sizes"),
    (["run", "speed", "--shapes", "1,6,1,1"], "--shapes: expected more than one value per channel"),
    (["run", "speed", "--shapes", "8,6", "8,6"], "--shapes: expected distinct shapes, got '8,6' twice"),
    (["run", "init-sweep", "--shapes", "8,6"], "--shapes: init-sweep runs its own models"),
    (["run", "all", "--quick", "--shapes", "8,6"], "--shapes: `run all` times the benchmark's shapes"),
    (["run", "speed", "--quick", "--bn", "torch"], "--bn: speed trains no network"),
    (["run", "speed", "--quick", "--seeds", "1,2"], "--seeds: speed trains no network"),
    (["run", "speed", "--quick", "--data-dir", "/tmp"], "--data-dir: speed trains no network"),
])  # fmt: skip
def test_bad_shapes_are_refused_naming_the_option_before_any_folder(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_with_other_shapes_is_refused(tmp_path, monkeypatch, capsys, keep_threads):
    torch.set_num_threads(1)
    monkeypatch.setattr(speed_timing, "interleaved_samples", _fixed_timer([]))
    out = tmp_path / "mine"
    assert main(["run", "speed", "--quick", "--shapes", "8,6", "--out", str(out)]) == 0
    assert main(["run", "speed", "--resume", "--shapes", "8,7", "--out", str(out)]) == 2
    assert "shapes: stored [[8, 6]], given [[8, 7]]" in capsys.readouterr().err


@pytest.mark.parametrize("device,counted", [("cpu", "forward+backward 5N"), ("cuda", "on a GPU forward 3N")])
def test_the_report_counts_the_traffic_of_the_device_that_ran(tmp_path, device, counted):
    """The GB/s of a GPU run count what speed_cases.TRAFFIC_GPU counts, and the report says so."""
    from bnlab.lab.runs import RunFolder

    exp = get("speed")
    config = {"experiment": "speed", "quick": True, "device": device, "seeds": [0],
              "units": ["mlp-small/nchw/fp32/fwd"]}
    config["params"] = exp.params(config)
    folder = RunFolder.create(tmp_path / "run", config)
    row = {"case": "mlp-small/nchw/fp32/fwd", "shape": "mlp-small", "dims": "256x100", "layout": "nchw",
           "dtype": "fp32", "mode": "fwd", "threads": 2, "machine": "a machine", "bnlab_ms": 0.01, "torch_ms": 0.03,
           "copy_ms": 0.004, "new_copy_ms": 0.005, "bnlab_GBps": 20.5, "copy_GBps": 51.2, "speedup": 3.0,
           "fraction_of_copy": 0.4}  # fmt: skip
    folder.save_unit("mlp-small/nchw/fp32/fwd", {"rows": [row]})
    findings = exp.findings(folder)
    assert counted in findings and "1 case on a machine" in findings
    assert "bnlab 3.00x torch.nn's speed (geometric mean of 1 case)" in findings


def test_run_all_gives_speed_none_of_the_training_options(tmp_path, monkeypatch, keep_threads):
    """`run all --bn torch --seeds 1` trains every network with torch.nn's BN and seed 1, and still
    runs speed, which refuses those options on its own, without them."""
    from bnlab.lab import experiments

    torch.set_num_threads(1)
    monkeypatch.setattr(speed_timing, "interleaved_samples", _fixed_timer([]))
    only = {name: get(name) for name in ("activations", "speed")}
    monkeypatch.setattr(experiments, "registry", lambda: only)
    out = tmp_path / "all"
    assert main(["run", "all", "--quick", "--bn", "torch", "--seeds", "1", "--out", str(out)]) == 0
    trained = json.loads((out / "activations" / "config.json").read_text())
    timed = json.loads((out / "speed" / "config.json").read_text())
    assert (trained["bn"], trained["seeds"]) == ("torch", [1])
    assert (timed["bn"], timed["seeds"]) == ("bnlab", [0])
    assert json.loads((out / "speed" / "summary.json").read_text())["complete"]
