"""benchmarks/bench_env.py: what a result file records of the machine. Two VMs both named
"AMD EPYC" differed in their vector extensions (AVX2 only against AVX-512), which decide how the
CPU kernels build; the record now says which one ran."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_env  # noqa: E402

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
flags\t\t: avx2 avx512_fp16
"""


def test_cpu_identity_reads_the_first_processor_and_the_kernel_flags_in_a_fixed_order():
    got = bench_env.cpu_identity(ZEN4)
    assert got == {
        "cpu_id": "AuthenticAMD family 25 model 17",
        "cpu_flags": "avx2 fma f16c avx512f avx512bw avx512dq avx512vl avx512_bf16",
    }


def test_cpu_identity_of_an_avx2_machine_lists_no_avx512_flag():
    text = "vendor_id : AuthenticAMD\ncpu family : 25\nmodel : 1\nflags : sse4_2 avx2 fma f16c\n"
    assert bench_env.cpu_identity(text) == {"cpu_id": "AuthenticAMD family 25 model 1", "cpu_flags": "avx2 fma f16c"}


def test_cpu_identity_leaves_out_what_the_text_lacks():
    assert bench_env.cpu_identity("") == {}
    assert bench_env.cpu_identity("model name : Neoverse\nflags : fp asimd\n") == {"cpu_flags": ""}
