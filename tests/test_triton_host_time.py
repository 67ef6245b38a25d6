"""benchmarks/triton_host_time.py: how many Triton kernels each GPU call launches, counted without a GPU.

Each call is timed both ways, bnlab's direct launches (of a stand-in compiled kernel) and Triton's
JITFunction.run (stubbed); the counts are the direct column's. The launch counts are the GPU path's structure (docs/benchmarks.md, "GPU (Triton)"): small rows
of channels take one program per forward, backward and eval (triton_small); the rest take three
kernels forward, two or three backward, and one or two in eval. A change that adds a launch shows up here. (The
script's microseconds are not asserted: timings belong in benchmarks, not tests.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parent.parent


def _launches(shape: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # nothing runs: launches are counted
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_host_time.py"), "--shapes", shape, "--calls", "3"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # "(4, 8, 3, 3)   training forward   direct  38.1 us  triton  29.3 us  3 launches"
    rows = re.findall(r"^\(.*?\)\s+(.+?)\s+direct\s+[\d.]+ us\s+triton\s+[\d.]+ us\s+(\d+) launches$", out.stdout,
                      re.MULTILINE)  # fmt: skip
    return {name.strip(): int(n) for name, n in rows}


def test_small_rows_of_channels_launch_one_kernel_per_call():
    assert _launches("40,6") == {"training forward": 1, "forward + backward step": 2, "eval": 1}


def test_other_inputs_launch_the_general_kernels():
    # (4, 8, 3, 3) is NCL: statistics, merge, normalize with the running averages; sums, then dx
    # with the sums merged in its tiles; eval's coefficients and normalize (rows of 9 values: a
    # tile spans too many channels to compute their coefficients itself)
    assert _launches("4,8,3,3") == {"training forward": 3, "forward + backward step": 5, "eval": 2}
    # rows of channels beyond the one-program bound (64 Ki values): sums, merge, dx
    assert _launches("1000,100") == {"training forward": 3, "forward + backward step": 6, "eval": 2}


def test_the_direct_column_goes_through_bnlabs_launcher():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_host_time.py"), "--shapes", "4,8,3,3", "--calls", "3",
           "--launch", "direct"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    remembered = re.search(r"# direct launches: (\d+) specializations remembered", out.stdout)
    assert remembered and int(remembered.group(1)) >= 5, out.stdout  # forward, backward and eval kernels


def test_python_path_column_times_the_calls_with_the_compiled_calls_off():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_host_time.py"), "--shapes", "40,6", "--calls", "3",
           "--launch", "direct", "--python-path"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\(.*?\)\s+(.+?)\s+direct\s+[\d.]+ us\s+(\d+) launches\s+python path\s+[\d.]+ us$", out.stdout,
                      re.MULTILINE)  # fmt: skip
    assert {name.strip(): int(n) for name, n in rows} == {"training forward": 1, "forward + backward step": 2,
                                                           "eval": 1}, out.stdout  # fmt: skip


def test_eval_of_long_rows_launches_one_kernel():
    # rows of 36 values: each tile computes its few channels' coefficients (eval_one_launch)
    assert _launches("4,8,6,6") == {"training forward": 3, "forward + backward step": 5, "eval": 1}


def test_profile_names_the_step_functions_and_cuda_without_a_gpu_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    script = str(ROOT / "benchmarks" / "triton_host_time.py")
    cmd = [sys.executable, script, "--shapes", "4,8,3,3", "--calls", "3", "--profile", "5"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # the cProfile table of the step, with the Triton launchers bnlab calls among its rows
    assert "Ordered by: internal time" in out.stdout and "triton_ops.py" in out.stdout
    if not __import__("torch").cuda.is_available():
        refused = subprocess.run([sys.executable, script, "--device", "cuda"], env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        assert refused.returncode == 2 and "--device cuda: no CUDA device is available" in refused.stderr


def test_a_negative_profile_is_refused_naming_the_option():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_host_time.py"), "--profile", "-5"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--profile: expected a number of steps >= 0" in out.stderr
