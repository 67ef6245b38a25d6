"""The CPU kernels compute the same bits whatever vector extensions the build targets.

bnlab compiles its kernels with -march=native, so an AVX-512 machine runs other code than an
AVX2 one: 16-lane forms, different loops vectorised by the compiler. Every such form keeps the
lanes, the operations and the order of the portable code (an FMA wherever a multiply feeds an
add), so the results must not depend on the machine. Here the same sources are built a second
time for x86-64-v3 (AVX2, FMA, F16C: the baseline of any x86 CPU bnlab's fast paths target), and
benchmarks/compare_builds.py compares that build with this machine's native one on 7200
results: eval and training outputs, statistics, running averages and gradients (every NCL and
NLC walk, four dtypes, 1-2 threads, NaN/inf data). Even without AVX-512 the two builds differ in
their tuning: on an AVX-512 machine (the project's Xeon VM) the test once found 36 results that
differed, and on an AMD Zen 3 machine (the EPYC VM) 218: GCC's tuning for Zen (--param avoid-fma-max-bits=256)
split the multiply-add chains of loops that accumulate Σdy·(x - hi) into a multiply and an add,
until those accumulations were written as std::fma. Another part of that tuning vectorised a
float64 row's scalar tail differently (24 results), until the tail's product-sum was a std::fma too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.backends import cpu_build

ROOT = Path(__file__).resolve().parent.parent
X86_64_V3 = ("avx2", "fma", "f16c", "bmi2")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(not set(X86_64_V3) <= _cpu_flags(), reason="the CPU cannot run an x86-64-v3 build")
def test_an_avx2_build_computes_the_native_builds_bits(tmp_path):
    native = cpu_build.load()
    if native is None or not hasattr(native, "bn_empty") or cpu_build._compiler() is None:
        pytest.skip(f"no compiled kernel module here: {cpu_build.load_error()}")
    include = cpu_build._python_include()
    target = tmp_path / "bnlab_cpu_module_v3.so"
    flags = ["-march=x86-64-v3", "-fopenmp", "-DBNLAB_PYTHON_MODULE", f"-I{include}"]
    error = cpu_build._compile(cpu_build._compiler(), flags, target)
    assert error is None, error
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(ROOT / "src"), os.environ.get("PYTHONPATH", ""))))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_builds.py"), "--old", str(target)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and last.endswith(" 0 differ"), out.stdout[-3000:] + out.stderr[-3000:]
    assert int(last.split()[0]) >= 2000, last  # the comparison really ran its cases
