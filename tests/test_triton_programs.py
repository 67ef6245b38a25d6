"""The reduce kernels' program count (triton_plan.PROGRAMS_PER_SM) and the scripts that vary it
(benchmarks/triton_programs.py, bench_bn.py --triton-programs), without a GPU: plans are made for
a GPU from shapes alone (meta tensors), and the scripts' refusals are checked before any GPU work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bnlab.backends import triton_plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.parametrize("shape,channels_last", [((32, 64, 56, 56), False), ((128, 64, 112, 112), True),
                                                 ((65536, 100), False)])  # fmt: skip
def test_programs_per_sm_sets_how_many_segments_the_reduce_grid_has(monkeypatch, shape, channels_last):
    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    programs = {}
    for per_sm in (2, 4, 8):
        monkeypatch.setattr(triton_plan, "PROGRAMS_PER_SM", per_sm)
        p = triton_plan.plan(x, for_gpu=True)
        channel_blocks = p.c if p.ncl else -(-p.c // p.block_b)
        programs[per_sm] = channel_blocks * p.segments
        wanted = per_sm * triton_plan._ASSUMED_SM_COUNT
        # about as many programs as wanted: segments are rounded to whole tiles (NLC: whole row
        # blocks), which can leave up to half of them out, and never more than one extra per channel block
        assert wanted / 2 <= programs[per_sm] <= wanted + channel_blocks, (per_sm, p)
    assert programs[2] < programs[4] < programs[8]


def test_the_interpreter_plans_are_unaffected(monkeypatch):
    x = torch.empty(4, 6, 5, 7)
    before = triton_plan.plan(x, for_gpu=False)
    monkeypatch.setattr(triton_plan, "PROGRAMS_PER_SM", 16)
    assert triton_plan.plan(x, for_gpu=False) == before


@pytest.mark.parametrize("argv,expected", [
    (["--per-sm", "4,0"], "--per-sm: expected comma-separated positive integers"),
    (["--per-sm", "four"], "--per-sm: expected comma-separated positive integers"),
    (["--shapes", "gpu-999"], "--shapes: expected names from"),
    (["--layouts", "nhwc"], "--layouts: expected names from"),
])  # fmt: skip
def test_triton_programs_refuses_bad_options_naming_them(argv, expected, capsys):
    pytest.importorskip("triton")
    import triton_programs

    with pytest.raises(SystemExit) as info:
        triton_programs.main(argv)
    assert info.value.code == 2 and expected in capsys.readouterr().err


def test_bench_bn_refuses_a_program_count_below_one(capsys):
    import bench_bn

    with pytest.raises(SystemExit) as info:
        bench_bn.main(["--device", "cuda", "--triton-programs", "0", "--report", "--out", "/nonexistent/x.jsonl"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--triton-programs: expected a positive number" in err and "got 0" in err


def test_bench_bn_cases_under_another_program_count_are_cases_of_their_own():
    import bench_bn

    base = {"device": "cuda", "threads": 16, "shape": "gpu-112", "layout": "nchw", "dtype": "fp32", "mode": "fwd"}
    assert bench_bn._case_id({**base, "triton_programs": 8}) != bench_bn._case_id(base)
    assert bench_bn._case_id({**base, "triton_programs": 8}).endswith("/programs=8")
    assert bench_bn._case_id({**base, "triton_row_fit": True}).endswith("/row_fit")
    assert bench_bn._case_id({**base, "triton_row_fit": True}) != bench_bn._case_id(base)


@pytest.fixture
def programs_on_a_stand_in_gpu(monkeypatch):
    """triton_programs with torch.cuda answering as if a GPU were there (the timing functions are
    replaced by each test) and no compiled kernels to list."""
    pytest.importorskip("triton")
    import triton_programs

    monkeypatch.setattr(triton_programs, "registers", lambda: ["stats_ncl_kernel: 96 registers, 0 spills"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    return triton_programs


def test_triton_programs_ranks_the_counts_per_layout_and_prints_the_lines_the_round_reads(
    programs_on_a_stand_in_gpu, monkeypatch, capsys
):
    triton_programs = programs_on_a_stand_in_gpu

    def fake_case(shape_name, layout, dtype_name, counts, rounds):
        # nchw fastest at 6 programs per SM, channels-last at the default 4; 8 refused in one case
        best = 6 if layout == "nchw" else 4
        gbps = {c: {"stats": 3000 - 100 * abs(c - best), "grad_sums": 4000 - 50 * abs(c - best)} for c in counts}
        rejected = {8: "y differs"} if (layout, dtype_name) == ("cl", "bf16") else {}
        for c in rejected:
            gbps.pop(c)
        return {"gbps": gbps, "segments": {c: 2 * c for c in counts}, "rejected": rejected}

    monkeypatch.setattr(triton_programs, "run_case", fake_case)
    assert triton_programs.main(["--shapes", "gpu-112", "--per-sm", "2,4,6,8"]) == 0
    out = capsys.readouterr().out
    assert "best programs per SM, nchw: 6" in out and "best programs per SM, cl: 4" in out
    assert "8 REJECTED y differs" in out and "stats_ncl_kernel: 96 registers" in out
    # a count refused in one case is not ranked for that layout (it was not timed everywhere)
    cl_line = next(line for line in out.splitlines() if line.startswith("cl: time vs 4"))
    assert "8=" not in cl_line and "6=" in cl_line


def test_row_fit_report_says_better_only_when_the_fitted_rows_take_under_0_98_of_the_time(
    programs_on_a_stand_in_gpu, monkeypatch, capsys
):
    triton_programs = programs_on_a_stand_in_gpu

    monkeypatch.setattr(triton_programs, "run_case", lambda *a: {"gbps": {4: {"stats": 1, "grad_sums": 1}},
                                                                 "segments": {4: 8}, "rejected": {}})  # fmt: skip
    kernels = triton_programs.REDUCE

    def fake_fit(speedup):
        def run(shape_name, dtype_name, rounds):
            if shape_name == "gpu-112" and dtype_name == "bf16":
                return None  # the fitted plan is the default one
            if dtype_name == "fp16":
                return {"gbps": {}, "widths": (1024, 128), "rejected": "dx differs"}
            gbps = {"default": {k: 3000.0 for k in kernels}, "fit": {k: 3000.0 * speedup for k in kernels}}
            return {"gbps": gbps, "widths": (1024, 128), "rejected": None}

        return run

    argv = ["--shapes", "gpu-112,gpu-56", "--dtypes", "fp32,bf16,fp16", "--per-sm", "4", "--row-fit"]
    monkeypatch.setattr(triton_programs, "run_row_fit", fake_fit(1.25))
    assert triton_programs.main(argv) == 0
    out = capsys.readouterr().out
    assert "row fit gpu-112/nchw/bf16: the same tiles" in out and "REJECTED dx differs" in out
    assert "BLOCK_L 1024 -> 128; GB/s stats 3000 -> 3750" in out
    assert "geometric mean over the reduce kernels): 0.800" in out and "row fit better: yes" in out
    monkeypatch.setattr(triton_programs, "run_row_fit", fake_fit(1.01))  # within noise: not better
    assert triton_programs.main(argv) == 0
    assert "row fit better: no" in capsys.readouterr().out


def test_reduce_kernels_are_timed_under_each_labelled_plan(monkeypatch):
    # the timing helper itself, on CPU tensors through Triton's interpreter (no GPU here)
    pytest.importorskip("triton")
    import triton_programs

    from bnlab.backends import triton_ops

    x, dy = torch.randn(4, 3, 5, 7), torch.randn(4, 3, 5, 7)
    plans = {"default": triton_ops.plan(x, for_gpu=False)}
    monkeypatch.setattr(triton_plan, "ROW_FIT", True)
    plans["fit"] = triton_ops.plan(x, for_gpu=False)
    assert plans["fit"].block_b < plans["default"].block_b
    gbps = triton_programs._reduce_gbps(triton_ops, x, dy, plans, rounds=1)
    assert set(gbps) == {"default", "fit"}
    assert all(set(row) == {"stats", "grad_sums"} and min(row.values()) > 0 for row in gbps.values())
