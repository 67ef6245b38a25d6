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
The build and the comparison (about 60 s) are a background check (tests/background_checks.py):
they start when collection ends and run niced beside the suite. The x86-64-v3 build is made in one
compiler run, as cpu_build's fallback makes it, while the native one is made as cpu_build makes it
(in parts at once on two cores or more: cpu_kernels.cpp, *Parts*): the same comparison holds the
parts to the one file (their inlining could differ, and with it the bits).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import background_checks
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


CAN_RUN_V3 = set(X86_64_V3) <= _cpu_flags()

# Compiles the x86-64-v3 build (in one file) into the check's folder, then compares it with the native build.
_COMPILE_THEN_COMPARE = """
import subprocess, sys
from pathlib import Path
from bnlab.backends import cpu_build, cpu_compile
target, compare, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
error = cpu_compile._compile_whole(cpu_build._compiler(), flags, Path(target))
if error is not None:
    sys.exit(f"the x86-64-v3 build failed: {error}")
sys.exit(subprocess.run([sys.executable, compare, "--old", target]).returncode)
"""


def _avx2_build_check(folder: Path) -> list:
    """The one command of the "avx2-build" background check (tests/background_checks.py)."""
    target = folder / "bnlab_cpu_module_v3.so"
    flags = ["-march=x86-64-v3", "-fopenmp", "-DBNLAB_PYTHON_MODULE", f"-I{cpu_build._python_include()}"]
    argv = [sys.executable, "-c", _COMPILE_THEN_COMPARE, str(target), str(ROOT / "benchmarks" / "compare_builds.py")]
    return [(argv + flags, background_checks.environment())]


if CAN_RUN_V3:
    background_checks.register("avx2-build", _avx2_build_check)


@pytest.mark.skipif(not CAN_RUN_V3, reason="the CPU cannot run an x86-64-v3 build")
@pytest.mark.background("avx2-build")
def test_an_avx2_build_computes_the_native_builds_bits(background):
    native = cpu_build.load()
    if native is None or not hasattr(native, "bn_empty") or cpu_build._compiler() is None:
        pytest.skip(f"no compiled kernel module here: {cpu_build.load_error()}")
    (out,) = background.result("avx2-build")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0 and last.endswith(" 0 differ"), out.stdout[-3000:] + out.stderr[-3000:]
    assert int(last.split()[0]) >= 2000, last  # the comparison really ran its cases
