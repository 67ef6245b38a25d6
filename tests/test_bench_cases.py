"""The benchmark's cases (bnlab.lab.speed_cases, re-exported by benchmarks/bench_cases.py) and
bench_bn.py's command line: every contender of a case does the same work, and an unknown name is
refused naming its option."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_bn  # noqa: E402
import bench_cases  # noqa: E402

from bnlab.lab import speed_cases, speed_timing  # noqa: E402


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd", "eval", "frozen_fwdbwd"])
@pytest.mark.parametrize("shape,layout", [((32, 6), "nchw"), ((4, 6, 5, 5), "nchw"), ((4, 6, 5, 5), "cl")])
def test_bnlab_and_torch_contenders_compute_the_same_thing(mode, shape, layout, monkeypatch):
    """bnlab's and torch.nn's callables agree (outputs, or the gradients of input, weight and bias),
    with their layers in the mode's training flag: frozen_fwdbwd trains through eval-mode layers."""
    modes_seen = []
    real = speed_cases.bn_layer

    def recording(*args):
        layer = real(*args)
        modes_seen.append(layer)
        return layer

    monkeypatch.setattr(speed_cases, "bn_layer", recording)
    fns = bench_cases.contenders(shape, layout, torch.float32, mode, "cpu", compile_torch=False)
    assert set(fns) == {"bnlab", "torch", "copy", "copy_"}
    assert [layer.training for layer in modes_seen] == [mode in ("fwd", "fwdbwd")] * 2
    with bench_cases.sample_grad_mode(mode):
        ours, theirs = fns["bnlab"](), fns["torch"]()
    if mode in ("fwdbwd", "frozen_fwdbwd"):
        assert len(ours) == len(theirs) == 3  # dx, dweight, dbias
    else:
        ours, theirs = [ours], [theirs]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(fns["copy"](), fns["copy_"]())


@pytest.mark.parametrize("mode,grad", [("eval", False), ("fwd", True), ("fwdbwd", True)])
def test_eval_is_timed_inside_one_no_grad_and_training_with_gradients_on(mode, grad, monkeypatch):
    """bench_bn times eval with gradients off around the whole sample (no per-call no_grad, which
    the copies would not pay), records it, and its calls then build no graph."""
    seen = {}

    def timing(fns, device, rounds, min_sample):
        seen["grad"] = torch.is_grad_enabled()
        seen["graph"] = [fns[name]() for name in ("bnlab", "torch")]
        return {name: [1e-3] for name in fns}

    monkeypatch.setattr(speed_timing, "interleaved_samples", timing)
    args = argparse.Namespace(device="cpu", compile=False, rounds=1, min_sample=0.0)
    rec = bench_bn.run_case({"shape": "mlp-small", "layout": "nchw", "dtype": "fp32", "mode": mode}, args)
    assert seen["grad"] is grad and rec["grad_enabled"] is grad and torch.is_grad_enabled()
    if mode == "eval":
        assert all(y.grad_fn is None and not y.requires_grad for y in seen["graph"])
        outside = bench_cases.contenders((8, 6), "nchw", torch.float32, "eval", "cpu", False)["bnlab"]()
        assert outside.requires_grad  # the same call outside it builds one: the context keeps the graph out


def test_frozen_fwdbwd_counts_the_traffic_of_a_forward_and_backward():
    numel_bytes = 4 * 6 * 5 * 5 * 4
    assert bench_cases.traffic_bytes((4, 6, 5, 5), torch.float32, "frozen_fwdbwd") == 5 * numel_bytes
    assert bench_cases.traffic_bytes((4, 6, 5, 5), torch.float32, "frozen_fwdbwd", "cuda") == 5 * numel_bytes


@pytest.mark.parametrize("option,value", [("--modes", "fwd,frozen"), ("--shapes", "conv-99"), ("--dtypes", "fp8"),
                                          ("--layouts", "nhwc")])  # fmt: skip
def test_an_unknown_name_is_refused_naming_the_option_and_the_name(option, value, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench_bn.main([option, value, "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert f"{option}: expected names from" in err and repr(value.split(",")[-1]) in err
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_backward_ab_runs_and_prints_a_row_per_shape(capsys, keep_threads):
    import eval_backward_ab

    eval_backward_ab.main(["--shapes", "2,8,48,48", "3,4,5,5", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("(")]
    assert [r[:4] for r in rows] == [["(2,", "8,", "48,", "48)"], ["(3,", "4,", "5,", "5)"]]
    assert all(float(v) > 0 for r in rows for v in r[4:])


@pytest.mark.parametrize("text", ["0", "-5", "nan", "inf", "soon"])
def test_a_duration_that_is_not_a_positive_number_is_refused(text):
    # the fuzzers' --seconds: argparse turns the ArgumentTypeError into "argument --seconds: ..."
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive number"):
        bench_cases.positive_float(text)
    assert bench_cases.positive_float("2.5") == 2.5


def test_report_of_gpu_results_needs_no_gpu_and_judges_cudnn_on_float32(tmp_path, capsys):
    """--report --device cuda summarizes a GPU run's file on any machine; the cuDNN line counts
    float32 cases only (torch.nn runs PyTorch's native kernels for bf16)."""
    src = ROOT / "benchmarks" / "results" / "h200_s23_round2_lanes_gpu.jsonl"
    assert bench_bn.main(["--device", "cuda", "--report", "--out", str(src)]) == 0
    out = capsys.readouterr().out
    # the two float32 NCHW forwards of that run: 2.729x and 1.174x torch.nn
    expected = (2.729 * 1.174) ** 0.5
    assert f"fwd fp32 NCHW 4D vs torch (cuDNN): geometric mean {expected:.2f}x, min 1.17x" in out


def test_report_judges_the_eval_target_at_every_case_of_each_dtype(capsys):
    """The summary lists each dtype's eval cases below 0.90 of copy_: the forty-ninth session's
    notes named (256, 100) alone, where its files hold four such float32 cases."""
    src = ROOT / "benchmarks" / "results" / "bench_bn_zen4_s49_b.jsonl"
    assert bench_bn.main(["--report", "--out", str(src)]) == 0
    out = capsys.readouterr().out
    assert "eval fp32 cases below 0.90 of copy_: 4 of 14\n  cpu/2/mlp-small/nchw/fp32/eval: 0.63\n" in out
    assert "  cpu/2/conv-14/cl/fp32/eval: 0.85\n" in out
    assert "fwd fp32 NCHW conv-56: 29.64 GB/s effective" in out


def test_plot_draws_the_results_file_after_a_report(tmp_path, capsys):
    """--plot PNG draws the results (plot_bench.py) after the run, or after --report as here."""
    src = ROOT / "benchmarks" / "results" / "bench_bn_zen3_s35.jsonl"
    png = tmp_path / "speed.png"
    assert bench_bn.main(["--report", "--out", str(src), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and "wrote " in capsys.readouterr().out


def test_a_results_file_that_is_not_json_lines_is_refused_naming_out_and_the_line(tmp_path, capsys):
    """bench_bn.py reads its --out to resume or report (bench_results.read, plot_bench's reader too)."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"environment": {}, "command": "bench_bn.py"}\n{"results": \n')
    with pytest.raises(SystemExit):
        bench_bn.main(["--report", "--out", str(path)])
    assert f"--out: line 2 of {path} is not JSON" in capsys.readouterr().err


def test_resuming_keeps_the_last_record_of_each_case_in_file_order(tmp_path):
    import json

    import bench_results

    key = {"device": "cpu", "threads": 2, "shape": "mlp-small", "layout": "nchw", "dtype": "fp32", "mode": "eval"}
    rows = [{"environment": {"cpu": "x"}, "command": "c"}, {**key, "results": {"bnlab": 1}, "ratios": {}},
            {**key, "mode": "fwd", "results": {"bnlab": 2}, "ratios": {}}, {**key, "results": {"bnlab": 3}, "ratios": {}}]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    header, cases = bench_results.read(path)
    assert header == rows[0] and cases == rows[1:]
    done = bench_bn.load_done(path)
    assert [rec["results"]["bnlab"] for rec in done.values()] == [3, 2]
    assert bench_bn.load_done(tmp_path / "none.jsonl") == {}


def test_eval_paths_takes_an_input_of_any_rank_and_prints_every_path(capsys, keep_threads):
    # eval_paths.py --shape takes the MLP shapes too (shape_parser(any_rank=True)); the per-shape
    # scripts that walk N,C,H,W keep refusing other ranks, naming the option
    import eval_paths

    eval_paths.main(["--shape", "16,5", "--rounds", "5", "--reps", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith("# eval_paths.py --shape 16,5 --layout nchw --threads 1")
    times = {line[:34].strip(): float(line[34:].split()[0]) for line in out.splitlines()[1:-1]}
    assert set(times) == {"module call (compiled layer call)", "module call, Python path", "bn_eval_module alone",
                          "via nn.Module.__call__", "kernel alone, held output", "copy_ (buffer allocated once)"}
    assert all(t > 0 for t in times.values())
    parser = bench_cases.shape_parser("doc", "2,3,4,4")
    with pytest.raises(SystemExit):
        parser.parse_args(["--shape", "16,5"])
    assert "--shape: expected 4 comma-separated positive sizes (N,C,H,W)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # rows have no channels-last form: refused, not timed as NCHW
        eval_paths.main(["--shape", "16,5", "--layout", "cl"])
    assert "--layout cl: channels-last needs a 4D or 5D --shape, got 2D (16, 5)" in capsys.readouterr().err


def test_eval_order_prints_both_orders_and_leaves_grad_mode_on(capsys, keep_threads):
    # eval_order.main() times inference inside a no_grad block; it used to switch grad mode off for
    # the rest of the process (conftest's _grad_mode_left_on fails a test that leaves it off)
    import eval_order

    eval_order.main(["--shape", "2,4,3,3", "--rounds", "2", "--reps", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shape (2, 4, 3, 3) nchw, 1 thread,")
    assert [line.split()[0] for line in lines[1:]] == ["after-copy", "after-bnlab"]
    assert torch.is_grad_enabled()


def test_the_markdown_gives_the_per_round_spread_where_a_record_has_it():
    """bench_bn's table: "2.5x (2.1-2.9)" from measure_case's spread; records written before the
    spread was kept (the results files of earlier sessions) keep "2.5x"."""
    results = {name: {"ms": 1.0, "GBps": 2.0} for name in ("bnlab", "torch", "copy", "copy_")}
    record = {"threads": 2, "shape_dims": [8, 6], "layout": "nchw", "dtype": "fp32", "mode": "eval",
              "results": results, "ratios": {"bnlab_vs_torch": 2.5, "bnlab_fraction_of_copy": 0.5,
                                             "bnlab_fraction_of_copy_": 0.4}}  # fmt: skip
    old = bench_bn.markdown([record]).splitlines()[-1]
    spread = {"bnlab_vs_torch": [2.1, 2.9], "bnlab_fraction_of_copy": [0.45, 0.6],
              "bnlab_fraction_of_copy_": [0.3, 0.5]}
    new = bench_bn.markdown([{**record, "spread": spread}]).splitlines()[-1]
    assert "| 2.5x |  | 0.5 / 0.4 |" in old
    assert "| 2.5x (2.1-2.9) |  | 0.5 (0.45-0.6) / 0.4 (0.3-0.5) |" in new


def test_the_fractions_of_a_copy_carry_their_per_round_spread_scaled_by_the_traffic(monkeypatch):
    """measure_case keeps the middle half of every ratio read round by round, the fractions of
    each copy's GB/s too: a copy moves 2N bytes and a forward+backward 5N, so a round whose copy
    took bnlab's time reads a fraction of 2.5."""
    bnlab_rounds = [2.0, 1.0, 4.0]  # against copies of 2 s in every round: copy / bnlab of 1, 2 and 0.5

    def timing(fns, device, rounds, min_sample_s):
        return {name: list(bnlab_rounds) if name == "bnlab" else [2.0] * 3 for name in fns}

    monkeypatch.setattr(speed_timing, "interleaved_samples", timing)
    rec = speed_cases.measure_case((8, 6), "nchw", "fp32", "fwdbwd")
    # per-round fractions 2.5 * (0.5, 1, 2): inclusive quartiles 2.5 * 0.75 and 2.5 * 1.5
    for key in ("bnlab_fraction_of_copy", "bnlab_fraction_of_copy_"):
        assert rec["ratios"][key] == 2.5
        assert rec["spread"][key] == [1.875, 3.75]
    assert rec["spread"]["bnlab_vs_torch"] == [0.75, 1.5]


def test_within_takes_another_rounding_and_refuses_other_values_or_nonfinite_places():
    """compare_builds.within (the generic build's check, test_backend_cpu_isa.py): a few epsilons
    of the result's scale pass, more do not, nor a NaN or an infinity where the other has none."""
    import compare_builds

    b = torch.tensor([1.0, -4.0, float("nan"), float("inf")])
    eps4 = 4 * torch.finfo(torch.float32).eps  # of the scale: 4 epsilons of 4.0 is 16 of 1.0
    near = torch.tensor([1.0 + 4 * eps4, -4.0, float("nan"), float("inf")])
    assert compare_builds.within(near, b, 4.0) and not compare_builds.within(near, b, 3.9)
    assert not compare_builds.within(torch.tensor([1.0, -4.0, 0.0, float("inf")]), b, 1e6)
    assert not compare_builds.within(torch.tensor([1.0, -4.0, float("nan"), -float("inf")]), b, 1e6)
    assert compare_builds.within(b.clone(), b, 1.0)


@pytest.mark.parametrize("value", ["0", "1,x", ""])
def test_compare_builds_refuses_thread_counts_that_are_not_positive_numbers(value, capsys, tmp_path):
    import compare_builds

    with pytest.raises(SystemExit):
        compare_builds.main(["--old", str(tmp_path / "none.so"), "--threads", value])
    assert f"--threads: expected positive thread counts separated by commas, got {value!r}" in capsys.readouterr().err


def test_a_ratio_is_the_median_of_the_rounds_ratios_when_the_machine_changes_speed(monkeypatch):
    """The float32 (256, 100) eval of benchmarks/results/ratio_of_medians_zen4_s56.txt: the machine
    sped up after round 3, the ratio of the two medians read 3.12x where the rounds read 3.61-3.76x
    in their middle half; the reported ratio is the rounds' median, inside its bracket."""
    bnlab_us = [5.74, 5.99, 6.12, 5.95, 3.99, 4.87, 4.07, 4.0, 4.11]
    torch_us = [20.88, 23.29, 23.53, 15.25, 14.49, 14.88, 15.19, 15.03, 14.8]
    copy_us = [3.74, 3.66, 3.72, 3.72, 2.77, 2.99, 2.98, 2.73, 2.75]
    rounds = {"bnlab": bnlab_us, "torch": torch_us, "copy": copy_us, "copy_": copy_us}
    monkeypatch.setattr(speed_timing, "interleaved_samples", lambda fns, *args: {n: rounds[n] for n in fns})
    rec = speed_cases.measure_case((8, 6), "nchw", "fp32", "eval")
    assert round(torch_us[6] / bnlab_us[5], 2) == 3.12  # what the ratio of the medians read
    # the middle of the nine rounds' ratios is round 0's, for torch.nn (3.64x) and for copy_ (0.65;
    # the ratio of the medians read 0.61)
    assert rec["ratios"]["bnlab_vs_torch"] == round(torch_us[0] / bnlab_us[0], 3) == 3.638
    assert rec["ratios"]["bnlab_fraction_of_copy_"] == round(copy_us[0] / bnlab_us[0], 3) == 0.652
    for key in ("bnlab_vs_torch", "bnlab_fraction_of_copy_"):
        q1, q3 = rec["spread"][key]
        assert q1 <= rec["ratios"][key] <= q3
