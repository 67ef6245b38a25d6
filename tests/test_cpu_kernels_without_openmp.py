"""The CPU kernels build without OpenMP too (cpu_build's last variant, for a compiler that has none:
single-threaded kernels rather than the portable backend), so every OpenMP function the sources
call needs a stand-in in cpu_kernels.cpp's ``#ifndef _OPENMP`` branch. (omp_in_parallel had none
until the forty-sixth session, and that build failed; building it takes half a minute, so this
test reads the sources instead. The build itself, checked by hand that session:
``compare_builds.py`` against it, 15,120 results, 0 differ.)
"""

from __future__ import annotations

import re
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "src" / "bnlab" / "backends"


def test_every_openmp_function_the_kernels_call_has_a_stand_in():
    kernel_file = (SOURCES / "cpu_kernels.cpp").read_text()
    without = kernel_file.split("#ifdef _OPENMP", 1)[1].split("#else", 1)[1].split("#endif", 1)[0]
    stand_ins = set(re.findall(r"\b(omp_[a-z_]+)\(\)\s*\{", without))
    called = set()
    for path in [SOURCES / "cpu_kernels.cpp", *sorted(SOURCES.glob("cpu_kernels*.inc"))]:
        called |= set(re.findall(r"\b(omp_[a-z_]+)\(", path.read_text()))
    assert called, "no OpenMP call found: the pattern no longer matches the sources"
    assert called <= stand_ins, f"OpenMP functions without a stand-in for builds without OpenMP: {called - stand_ins}"
