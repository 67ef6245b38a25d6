"""Triton's compiler accepts every kernel variant bnlab launches (compiled for sm_90, no GPU needed).

The interpreter tests (test_triton.py) check what the kernels compute; they cannot see code the
compiler rejects. These tests run tests/triton_compile_worker.py in a fresh process without
TRITON_INTERPRET, so the kernels are really compiled to PTX and cubin by Triton's bundled ptxas.
The compile of every variant (about 95 s on two cores) is a background check
(tests/background_checks.py): it starts when collection ends and runs niced beside the suite.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import background_checks

# Triton is not imported here: this process runs it interpreted (tests/conftest.py sets
# TRITON_INTERPRET before collection); the compiling happens in worker processes without it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "triton_compile_worker.py"


def _env(cache_dir: Path) -> dict:
    """A worker's environment: compiling for real (no TRITON_INTERPRET), in a clean Triton cache."""
    return background_checks.environment(TRITON_CACHE_DIR=str(cache_dir))


PARTS = 2  # worker processes sharing the compiling, one per core of the project's machines


def _sm90_check(folder: Path) -> list:
    """The "triton-sm90" background check (tests/background_checks.py): PARTS workers at once,
    each in its own clean Triton cache (every variant really compiles), together every variant."""
    return [
        (
            [sys.executable, str(WORKER), "--arch", "90", "--resources", "--part", f"{k}/{PARTS}"],
            _env(folder / f"cache{k}"),
        )
        for k in range(PARTS)
    ]


if importlib.util.find_spec("triton") is not None:
    background_checks.register("triton-sm90", _sm90_check)


@pytest.mark.background("triton-sm90")
def test_every_launched_kernel_variant_compiles_for_sm90(background):
    parts = background.result("triton-sm90")
    lines, totals, compiled = [], set(), 0
    for output in parts:
        assert output.returncode == 0, output.stdout[-3000:] + output.stderr[-3000:]
        part = output.stdout.strip().splitlines()
        # no kernel keeps values in local memory: a spill would stall these bandwidth-bound kernels
        assert "spill bytes 0" in part, [line for line in part if "spill" in line and not line.endswith("spills 0")][:5]
        last = part[-1]
        assert last.startswith("compiled ") and " variants for sm_90 (part " in last, last
        compiled += int(last.split()[1])
        totals.add(int(last.rstrip(")").split()[-1]))
        lines += part
    assert len(totals) == 1 and compiled == totals.pop(), "the parts must split one list of variants"
    # 5 layouts x 3 dtypes x (forward, normalize, backward, fused) variants: far more than 100;
    # a count this low would mean the launchers stopped reaching the compiler
    assert compiled >= 150, compiled
    kernel_names = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert len(kernel_names) >= 5, kernel_names
    # FMA fusion is pinned on (triton_ops._COMPILE), so y = (x - hi)·scale + shift compiles to FMAs
    # whatever Triton's default; unfused, the normalize kernel would have none
    normalize = [line for line in lines if line.startswith("ok normalize_kernel ")]
    assert normalize and all(int(line.split(" fma ")[1].split()[0]) > 0 for line in normalize), normalize[:3]


def test_the_check_rejects_a_kernel_the_interpreter_accepts(tmp_path):
    """The bug class the check exists for: returns of different tile shapes under a constexpr branch."""
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _row(ptr, FIRST: tl.constexpr):
            offsets = tl.arange(0, 16)
            if FIRST:
                return tl.load(ptr + offsets)[:, None]
            return tl.load(ptr + offsets)[None, :]

        @triton.jit
        def broken(ptr, out, FIRST: tl.constexpr):
            tile = _row(ptr, FIRST)
            tl.store(out + tl.arange(0, 16), tl.sum(tile, axis=0 if FIRST else 1))
    '''))
    (tmp_path / "drive.py").write_text(textwrap.dedent('''
        import sys
        import torch
        from triton.backends.compiler import GPUTarget
        import triton_compile_worker as worker
        from broken_kernel import broken

        recorder = worker.Recorder(GPUTarget("cuda", 90, 32))
        recorder(broken, torch.empty(16), torch.empty(16), True, grid=(1,), warmup=False, enable_fp_fusion=True)
        print("compiled", len(recorder.seen))
    '''))
    env = _env(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), env["PYTHONPATH"]))
    result = subprocess.run([sys.executable, str(tmp_path / "drive.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED broken" in result.stderr, result.stderr[-3000:]


def test_the_check_rejects_a_launch_that_leaves_fma_fusion_to_the_default(tmp_path):
    """A launch without enable_fp_fusion=True would compute other bits under Triton 3.10."""
    (tmp_path / "drive.py").write_text(textwrap.dedent('''
        import torch
        from triton.backends.compiler import GPUTarget
        import triton_compile_worker as worker
        from bnlab.backends import triton_reduce as red

        recorder = worker.Recorder(GPUTarget("cuda", 90, 32))
        part = torch.empty(1, 4, 3, dtype=torch.float64)
        recorder(red.stats_ncl_kernel, torch.empty(2, 4, 8), part, 2, 4, 8, 1, 1, BLOCK_N=2, BLOCK_L=8, UNROLL=2,
                 grid=(4, 1), warmup=False)
        print("compiled", len(recorder.seen))
    '''))
    result = subprocess.run([sys.executable, str(tmp_path / "drive.py")], cwd=tmp_path, env=_env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED stats_ncl_kernel: launched without enable_fp_fusion=True" in result.stderr, result.stderr[-3000:]


def test_the_check_compiles_what_tritons_launcher_would_and_rejects_an_untyped_float(tmp_path):
    """The worker takes each launch's signature from Triton's own binder: a Python float is fp32
    there unless the parameter is typed (on a GPU eps = 1e-5 became 9.99999974738e-06 and a count
    past 2**24 was rounded, where the interpreter computed with the float64 values), integers equal
    to 1 are constants and pointers divisible by 16 are marked so (the variant a GPU compiles: one
    of them spilled 20 bytes where the unmarked one had spilled none)."""
    (tmp_path / "untyped_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def untyped(ptr, eps):
            tl.store(ptr, tl.load(ptr) + eps)
    '''))
    (tmp_path / "drive.py").write_text(textwrap.dedent('''
        import torch
        from triton.backends.compiler import GPUTarget
        import triton_compile_worker as worker
        from bnlab.backends import triton_reduce as red
        from untyped_kernel import untyped

        recorder = worker.Recorder(GPUTarget("cuda", 90, 32))
        c = 16
        args = (torch.empty(1, c, 3, dtype=torch.float64), torch.empty(2, c, 8), torch.empty(3, c, dtype=torch.float64),
                torch.empty(3, c), torch.empty(c), torch.empty(c), c, 1, 8, 1e-5)
        signature, constexprs, attrs = recorder.specialize(red.stats_merge_kernel, args,
                                                           dict(HAS_W=True, HAS_B=True, BLOCK_S=1))
        print("eps", signature["eps"], "S", signature["S"], "C", signature["C"], "x_ptr", attrs[(1,)])
        recorder(untyped, torch.empty(1, dtype=torch.float64), 1e-5, grid=(1,), warmup=False, enable_fp_fusion=True)
    '''))
    env = _env(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), env["PYTHONPATH"]))
    result = subprocess.run([sys.executable, str(tmp_path / "drive.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "eps fp64 S constexpr C i32 x_ptr [['tt.divisibility', 16]]" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0, result.stdout + result.stderr
    assert "FAILED untyped: float argument eps=1e-05 reaches a parameter without a type" in result.stderr, result.stderr
