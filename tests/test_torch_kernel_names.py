"""benchmarks/torch_kernel_names.py: which kernels (operators, on the CPU) one training step of each layer runs.

On a GPU it names cuDNN or PyTorch's native kernels for torch.nn (docs/benchmarks.md, "GPU
(Triton): first measurements"); on the CPU the same plumbing lists aten operators, which is what
this checks: torch.nn's step goes through aten's batch norm, bnlab's through none of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_listing_shows_torch_batch_norm_and_bnlab_without_it():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "torch_kernel_names.py"), "--device", "cpu", "--shape", "4,6,5,5",
           "--dtypes", "fp32"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(re.findall(r"^(torch\.nn fp32 (?:nchw|cl)|bnlab    fp32 (?:nchw|cl)): (.*)$", out.stdout, re.MULTILINE))
    assert len(rows) == 4, out.stdout
    for layout in ("nchw", "cl"):
        assert "aten::native_batch_norm" in rows[f"torch.nn fp32 {layout}"]
        assert "batch_norm" not in rows[f"bnlab    fp32 {layout}"]


def test_unknown_dtype_is_refused_naming_the_option():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "torch_kernel_names.py"), "--device", "cpu", "--dtypes", "fp8"]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 2 and "--dtypes: expected names from" in out.stderr and "'fp8'" in out.stderr
