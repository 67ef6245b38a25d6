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

A CPU without AVX2 (and any CPU that is not x86, whose builds have no x86 vector forms) runs the
kernels' scalar forms, which no other test compiles. A build for x86-64 (SSE2: no AVX2, no FMA
instruction, no F16C) runs them here. Without FMA instructions the compiler may not fuse a
multiply and an add, so the bits differ (a third of the results in the fifty-fifth session); the
check is that every result is within 16 epsilons of its dtype, scaled by its largest finite
magnitude, of the native build's, with NaN and infinities in the same places (measured: at most
5.7 epsilons, float64 M2 at 1e3 ± 0.01; `benchmarks/results/generic_build_zen4_s55.txt`), on one
and two threads (two thirds of compare_builds' cases, to keep the check near 80 s beside the suite).
"""

from __future__ import annotations

import platform
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
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
GENERIC_EPSILONS = 16  # how far the build without FMA may be from the native one (module docstring)

# Compiles a build for `-march` (in one file) into the check's folder, then compares it with the
# native build: bit for bit, or within some epsilons (compare_builds.py --within) when given.
_COMPILE_THEN_COMPARE = """
import subprocess, sys
from pathlib import Path
from bnlab.backends import cpu_build, cpu_compile
target, compare, within, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
error = cpu_compile._compile_whole(cpu_build._compiler(), flags, Path(target))
if error is not None:
    sys.exit(f"the {flags[0]} build failed: {error}")
# a build of other rounding: one and two threads (its scalar forms are the same on any count)
extra = [] if within == "bits" else ["--within", within, "--threads", "1,2"]
sys.exit(subprocess.run([sys.executable, compare, "--old", target, *extra]).returncode)
"""


def _build_check(march: str, within: str):
    """The command of a background check (tests/background_checks.py) that builds for ``march`` and
    compares that build with the native one (``within``: "bits", or a number of epsilons)."""

    def check(folder: Path) -> list:
        target = folder / f"bnlab_cpu_module_{march.split('=')[1]}.so"
        flags = [march, "-fopenmp", "-DBNLAB_PYTHON_MODULE", f"-I{cpu_build._python_include()}"]
        compare = str(ROOT / "benchmarks" / "compare_builds.py")
        argv = [sys.executable, "-c", _COMPILE_THEN_COMPARE, str(target), compare, within]
        return [(argv + flags, background_checks.environment())]

    return check


if CAN_RUN_V3:
    background_checks.register("avx2-build", _build_check("-march=x86-64-v3", "bits"))
if IS_X86_64:
    background_checks.register("generic-build", _build_check("-march=x86-64", str(GENERIC_EPSILONS)))


def _last_line_of(background, name: str) -> str:
    """The background check's last line of output, after asserting that it passed and really ran
    its cases (skips where this machine has no compiled kernel module to compare with)."""
    native = cpu_build.load()
    if native is None or not hasattr(native, "bn_empty") or cpu_build._compiler() is None:
        pytest.skip(f"no compiled kernel module here: {cpu_build.load_error()}")
    (out,) = background.result(name)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert int(last.split()[0]) >= 2000, last  # the comparison really ran its cases
    return last


@pytest.mark.skipif(not CAN_RUN_V3, reason="the CPU cannot run an x86-64-v3 build")
@pytest.mark.background("avx2-build")
def test_an_avx2_build_computes_the_native_builds_bits(background):
    assert _last_line_of(background, "avx2-build").endswith(" 0 differ")


@pytest.mark.skipif(not IS_X86_64, reason="the build for x86-64 compiles on x86-64 machines only")
@pytest.mark.background("generic-build")
def test_a_build_without_avx2_or_fma_runs_the_scalar_forms_within_a_few_epsilons(background):
    last = _last_line_of(background, "generic-build")
    assert last.endswith(f" 0 by more than {GENERIC_EPSILONS} epsilons"), last
