"""scripts/gpu_round.sh, the one call that spends a lent GPU's short lease, run here with a stand-in Python.

The stand-in records each command line and answers as the real scripts would (gpu_check's
"0 failure(s)" or a failure, the tuning script's "best tiles" line), so these tests check the
round's plumbing without a GPU: the stages' order, that a failed correctness check takes no
timings, that stages past the time budget are skipped, that everything lands in $OUT.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import background_checks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_round.sh"

STAND_IN = r"""#!/bin/bash
echo "$*" >> "$CALLS"
case "$*" in
  *gpu_check.py*) if [ "${CHECK_FAILS:-0}" = 1 ]; then echo "FAIL y (4, 6) float32"; echo "1 failure(s)"; exit 1; fi
                  echo "0 failure(s)";;
  *triton_tune.py*) echo "best tiles: 4096,8,2048,4,1024,4  (triton_plan.GPU_TILES = ...)";;
  *triton_programs.py*) echo "best programs per SM, nchw: 6"; echo "best programs per SM, cl: 4"
                        echo "row fit better: ${ROW_FIT_BETTER:-no}";;
  *--report*) echo "summary: cuda";;
esac
exit 0
"""


def _round(tmp_path, **env_extra) -> tuple[subprocess.CompletedProcess, list[str]]:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PY": str(stand_in), "OUT": str(tmp_path / "out"), "CALLS": str(calls), **env_extra}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return result, calls.read_text().splitlines() if calls.exists() else []


def _scripts(calls: list[str]) -> list[str]:
    """The benchmarks/*.py each call ran, in order (the environment probe, a -c call, left out)."""
    return [next(w for w in line.split() if w.endswith(".py")).split("/")[-1] for line in calls if ".py" in line]


def test_quick_round_checks_first_then_times_in_order(tmp_path):
    result, calls = _round(tmp_path, QUICK="1", BUDGET="300")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _scripts(calls) == ["gpu_check.py", "bench_bn.py", "triton_programs.py", "bench_bn.py",
                               "gpu_kernel_times.py", "triton_host_time.py", "gpu_graphs.py", "triton_tune.py",
                               "bench_bn.py"]  # fmt: skip
    # only the layout whose best count is not the default runs again, under that count
    rerun = [line for line in calls if "--triton-programs" in line]
    assert len(rerun) == 1 and "--triton-programs 6" in rerun[0] and "--layouts nchw" in rerun[0]
    assert "gpu_programs.jsonl" in rerun[0]
    assert not any("--triton-row-fit" in line for line in calls)  # the fitted rows were not faster


def test_fitted_rows_that_are_faster_run_the_nchw_cases_again_under_them(tmp_path):
    result, calls = _round(tmp_path, QUICK="1", BUDGET="600", ROW_FIT_BETTER="yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--row-fit" in next(line for line in calls if "triton_programs.py" in line)
    rerun = [line for line in calls if "--triton-row-fit" in line]
    assert len(rerun) == 1 and "--layouts nchw" in rerun[0] and "gpu_row_fit.jsonl" in rerun[0]
    assert "--quick" in calls[1] and "--report" in calls[-1]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "stage (gpu_check) exit 0" in log and "stage (host_time) exit 0" in log
    assert "best tiles: 4096,8,2048,4,1024,4" in result.stdout


def test_a_failed_check_takes_no_timings(tmp_path):
    result, calls = _round(tmp_path, QUICK="1", BUDGET="300", CHECK_FAILS="1")
    assert result.returncode == 1
    assert _scripts(calls) == ["gpu_check.py"]
    assert "no timings taken" in result.stdout and "FAIL y (4, 6) float32" in result.stdout


def test_full_round_reruns_the_targets_under_better_tiles(tmp_path):
    result, calls = _round(tmp_path, BUDGET="2000")
    assert result.returncode == 0, result.stdout + result.stderr
    tuned = [line for line in calls if "--triton-tiles 4096,8,2048,4,1024,4" in line]
    assert len(tuned) == 1 and "gpu_tuned.jsonl" in tuned[0]
    assert _scripts(calls)[0] == "gpu_check.py" and "--compile" in calls[-2]
    assert any("triton_programs.py" in line for line in calls)


def test_stages_past_the_budget_are_skipped(tmp_path):
    # 20 s leaves the check 10 s (under the 15 s a stage needs): nothing runs, nothing is timed
    result, calls = _round(tmp_path, QUICK="1", BUDGET="20")
    assert result.returncode == 1
    assert calls == [] or _scripts(calls) == []
    assert "stage (gpu_check) skipped" in result.stdout


def _dry_round(folder: Path) -> list:
    """The "gpu-round-dry" background check (tests/background_checks.py, 20 s): the round's DRY
    mode, its checks in Triton's interpreter."""
    env = background_checks.environment(DRY="1", PY=sys.executable, OUT=str(folder), TRITON_INTERPRET="1")
    return [(["bash", str(SCRIPT)], env)]


HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    background_checks.register("gpu-round-dry", _dry_round)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.background("gpu-round-dry")
def test_dry_run_passes_the_checks_in_the_interpreter(background):
    (result,) = background.result("gpu-round-dry")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failure(s)" in result.stdout


def test_a_budget_that_is_not_a_number_is_refused_naming_it(tmp_path):
    result, calls = _round(tmp_path, BUDGET="10m")
    assert result.returncode == 2 and calls == []
    assert "BUDGET: expected a whole number of seconds, got '10m'" in result.stderr
