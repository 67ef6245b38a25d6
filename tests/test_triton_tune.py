"""benchmarks/triton_tune.py: which tiles it picks from its timings, and its run through Triton's interpreter.

The timings themselves mean something only on a GPU; here the choice is checked on made-up
timings, and the whole script runs on a tiny input under TRITON_INTERPRET=1 (in a subprocess:
TRITON_INTERPRET must be set before the kernels are defined).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import background_checks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from triton_tune import best_tiles  # noqa: E402

DEFAULT, SMALL, LARGE = "2048,4,2048,4,1024", "1024,4,1024,4,1024,4", "4096,8,4096,8,2048,1"


def _record(ms: dict[str, dict[str, float]]) -> dict:
    """A case record with the given {candidate: {kernel: milliseconds}}."""
    return {"results": {f"{k}@{c}": {"ms": v} for c, kernels in ms.items() for k, v in kernels.items()}}


def test_each_family_takes_its_own_fastest_candidate():
    # SMALL halves the reduce kernels' time and slows the elementwise ones; LARGE the reverse
    fast_reduce = {"stats": 1.0, "grad_sums": 1.0, "normalize": 3.0, "grad_input": 3.0}
    fast_elementwise = {"stats": 3.0, "grad_sums": 3.0, "normalize": 1.0, "grad_input": 1.0}
    even = {"stats": 2.0, "grad_sums": 2.0, "normalize": 2.0, "grad_input": 2.0}
    records = [_record({DEFAULT: even, SMALL: fast_reduce, LARGE: fast_elementwise})] * 2
    chosen, ranking = best_tiles(records, [DEFAULT, SMALL, LARGE])
    # the reduce family's tile, warps, width and unroll from SMALL; the elementwise tile and warps from LARGE
    assert chosen == "1024,4,4096,8,1024,4"
    assert ranking["reduce"][0] == (SMALL, 0.5) and ranking["elementwise"][0] == (LARGE, 0.5)


def test_a_candidate_missing_from_a_case_does_not_compete():
    even = {"stats": 2.0, "grad_sums": 2.0, "normalize": 2.0, "grad_input": 2.0}
    faster = {k: 1.0 for k in even}
    # LARGE is fastest where it ran but was rejected in the second case
    records = [_record({DEFAULT: even, LARGE: faster}), _record({DEFAULT: even})]
    chosen, ranking = best_tiles(records, [DEFAULT, LARGE])
    assert chosen == DEFAULT + ",4"  # the unroll left out of DEFAULT: triton_plan.Tiles' default
    assert [c for c, _ in ranking["reduce"]] == [DEFAULT]


def test_the_geometric_mean_weighs_cases_alike():
    # SMALL: 4x faster in one case and 1.5x slower in two others: geometric mean 4^-1 * 1.5^2 -> 0.763 ^ (1/3)
    even = {"stats": 2.0, "grad_sums": 2.0, "normalize": 2.0, "grad_input": 2.0}
    records = [_record({DEFAULT: even, SMALL: {k: 0.5 for k in even}})] + [
        _record({DEFAULT: even, SMALL: {k: 3.0 for k in even}}) for _ in range(2)
    ]
    _, ranking = best_tiles(records, [DEFAULT, SMALL])
    assert dict(ranking["reduce"])[SMALL] == pytest.approx((0.25 * 1.5 * 1.5) ** (1 / 3), abs=1e-3)


def _dry_run_command(out: Path) -> tuple[list[str], dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_tune.py"), "--dry-run", "--rounds", "1",
           "--candidates", f"{DEFAULT};64,4,8,4,8", "--out", str(out)]  # fmt: skip
    return cmd, {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}


HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # the first run (20-25 s in the interpreter) is a background check (tests/background_checks.py)
    background_checks.register("triton-tune-dry", lambda folder: [_dry_run_command(folder / "tune.jsonl")])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.background("triton-tune-dry")
def test_dry_run_times_every_candidate_and_names_the_best(background, tmp_path):
    (result,) = background.result("triton-tune-dry")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tune.jsonl"  # a copy: the rerun below resumes from it
    out.write_text((result.folder / "tune.jsonl").read_text())
    header, *records = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["candidates"] == [DEFAULT, "64,4,8,4,8"]
    assert [(r["layout"], r["rejected"]) for r in records] == [("nchw", {}), ("cl", {})]
    for rec in records:  # four kernels under each candidate, and the copy
        assert len(rec["results"]) == 9 and all(v["ms"] > 0 for v in rec["results"].values())
    # in the interpreter an 8-value tile is much slower than the default's: the default wins
    assert f"best tiles: {DEFAULT},4 " in result.stdout
    cmd, env = _dry_run_command(out)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # resumes: nothing to time
    assert again.returncode == 0 and "copy_" not in again.stdout and "best tiles:" in again.stdout


def test_bad_candidates_are_named(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_tune.py"), "--dry-run", "--candidates", "2048,4,3,4,1024"]
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    result = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--candidates" in result.stderr and "powers of two" in result.stderr and "'2048,4,3,4,1024'" in result.stderr
