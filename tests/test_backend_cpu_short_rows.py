"""NCL rows shorter than a vector: the sums across channels give the per-channel walk's bits.

A row of fewer than 16 values (2x2 and 3x3 maps, a Conv1d output of length 10) has no whole
vector: every value is in its row's scalar tail, one chain of additions per channel. The channel
groups and the flat walk sum such rows for 8 channels at once (4 with AVX2), one channel per
vector lane, gathering value l of each row (cpu_kernels_ncl_tails.inc); the per-channel walk
still sums each channel's rows one after another (chunk_sums, add_grad_row). Each lane does what
the scalar tail did, in the same order, so every result of the flat walk, of the fused channel
groups and of the default bounds (from 128 KiB in cache the groups' sums, then one elementwise pass
in memory order) must equal the per-channel walk's to the bit: the statistics and everything
normalized with them, the gradient sums, dx, dweight and dbias,
in float32, bfloat16 and float16 (16-bit values are gathered as the 32-bit word that ends with
them; the first value of a sample's rows as the word it begins).

The cases cover rows of 2 to 15 values, groups of one and two blocks with remainders (channel
counts that leave 1 to 7 channels in the last block), one and two threads, the three kinds of data
of compare_builds.py for x (normal; 1e3 ± 0.01, float32 only; NaN, inf and 3e38 values, with NaNs
of other bits), and dy both normal and at 1e3 ± 0.01 (float32), where the centred backward's shift
of dy is not 0 and the sums of dy - shift and of (dy - shift)·(x - mean) differ from those of dy.
Each walk runs in a process of its own: the walk bounds (BNLAB_NCL_*) are read once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlab.backends import get_backend

pytestmark = pytest.mark.skipif(get_backend("cpu").kernels() is None, reason="the CPU kernels did not build")

ROOT = Path(__file__).resolve().parents[1]

# (rows of L values): (6, 70, 5) groups of 9 channels on one thread (a block of 8 and one of 1);
# (40, 37, 3), (33, 20, 10), (17, 13, 15): remainders of 5, 4 and 5; (64, 11, 9), (50, 3, 2);
# (300, 24, 5), (128, 70, 4) and (160, 64, 3, 3): 2^15 values or more, so two threads share them,
# and (in float32; (160, 64, 3, 3) in every dtype) 128 KiB or more, which by default take the
# groups' sums and then one elementwise pass in memory order (short_rows_two_passes)
SHAPES = [
    (6, 70, 5), (40, 37, 3), (33, 20, 10), (17, 13, 15), (64, 11, 9), (50, 3, 2), (300, 24, 5), (128, 70, 4),
    (160, 64, 3, 3),
]  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from compare_builds import bits_digest, make, run
    from bnlab.backends import cpu_build
    lib = cpu_build.load()
    f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
    CASES = [(f32, x, dy) for x in ("normal", "offset", "nonfinite") for dy in ("normal", "offset")]
    CASES += [(t, x, "normal") for t in (b16, f16) for x in ("normal", "nonfinite")]
    digests = {}
    for shape in json.loads(sys.argv[2]):
        for dtype, data, dy_data in CASES:
            x, dy = make(tuple(shape), dtype, data, 1, False), make(tuple(shape), dtype, dy_data, 2, False)
            for centred in (1, 0):
                for nt in (1, 2):
                    for name, t in run(lib, x, dy, nt, (centred,)).items():
                        key = f"{name} {tuple(shape)} {dtype} x={data} dy={dy_data} centred={centred} threads={nt}"
                        digests[key] = bits_digest(t)  # any NaN as any NaN
    print(json.dumps(digests))
    """
)

# Every input by channel (or waves of channels), flat (statistics and gradient sums by blocks of
# samples x channels in memory order), by channel groups of at most 1 MiB (fused: the flat bound
# at 0), and as the default bounds choose (the groups' sums, then a pass in memory order).
WALKS = {
    "default": {},
    "channels": {"BNLAB_NCL_FLAT_MAX_BYTES": "0", "BNLAB_NCL_GROUP_BYTES": "0"},
    "flat": {"BNLAB_NCL_FLAT_MAX_BYTES": str(1 << 40), "BNLAB_NCL_GROUP_BYTES": "0"},
    "groups": {"BNLAB_NCL_FLAT_MAX_BYTES": "0", "BNLAB_NCL_GROUP_BYTES": str(1 << 20)},
}


def walk_digests(walk: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_NCL_")}
    env.update(WALKS[walk])
    argv = [sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks"), json.dumps(SHAPES)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def by_channel() -> dict[str, str]:
    return walk_digests("channels")


@pytest.mark.parametrize("walk", ["flat", "groups", "default"])
def test_short_rows_summed_across_channels_give_the_per_channel_walks_bits(walk, by_channel):
    across = walk_digests(walk)
    # 9 shapes x 10 pairs of data (6 float32, 2 each 16-bit) x centred or not x 2 thread counts,
    # 12 results each
    assert len(across) == len(by_channel) == len(SHAPES) * 10 * 2 * 2 * 12
    differ = [key for key, digest in across.items() if by_channel[key] != digest]
    assert not differ, f"{len(differ)} of {len(across)} results differ, e.g. {differ[:8]}"


# Tensors between unreadable pages: one that begins a page and one that ends one. A gather of the
# word before a 16-bit row's first value, or past the last row, would read the page next to it
# and kill the process (SIGSEGV), which the test reports.
GUARDED = textwrap.dedent(
    """
    import ctypes, math, mmap, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from compare_builds import run
    from bnlab.backends import cpu_build
    lib = cpu_build.load()
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page, keep = mmap.PAGESIZE, []

    def guarded(shape, dtype, at_end, seed):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        pages = -(-size // page)
        buf = mmap.mmap(-1, (pages + 2) * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(base, page, 0) == 0 and libc.mprotect(base + (pages + 1) * page, page, 0) == 0
        start = base + page + (pages * page - size if at_end else 0)
        t = torch.frombuffer((ctypes.c_uint8 * size).from_address(start), dtype=dtype).view(shape)
        t.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
        keep.append(buf)
        return t

    done = 0
    for shape in ((33, 20, 10), (50, 3, 2), (40, 37, 3), (128, 70, 4), (160, 64, 3, 3)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for x_at_end in (False, True):
                x, dy = guarded(shape, dtype, x_at_end, 1), guarded(shape, dtype, not x_at_end, 2)
                for nt in (1, 2):
                    got = run(lib, x, dy, nt)
                    assert all(bool(torch.isfinite(t).all()) for t in got.values()), (shape, dtype)
                    done += 1
    print(done)
    """
)


@pytest.mark.parametrize("walk", ["flat", "groups", "default"])
def test_short_rows_read_nothing_outside_their_tensors(walk):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_NCL_")}
    env.update(WALKS[walk])
    done = subprocess.run([sys.executable, "-c", GUARDED, str(ROOT / "benchmarks")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode} (-11: a read outside the tensor): {done.stderr[-2000:]}"
    assert done.stdout.split()[-1] == str(5 * 3 * 2 * 2)
