"""NCL rows shorter than a vector: the sums across channels give the per-channel walk's bits.

A float32 row of fewer than 16 values (2x2 and 3x3 maps, a Conv1d output of length 10) has no
whole vector: every value is in its row's scalar tail, one float64 chain per channel. The channel
groups and the flat walk sum such rows for 8 channels at once (4 with AVX2), one channel per
vector lane, gathering value l of each row (cpu_kernels_ncl_tails.inc); the per-channel walk
still sums each channel's rows one after another (chunk_sums, add_grad_row). Each lane does what
the scalar tail did, in the same order, so every result of the three walks must agree to the
bit: the statistics and everything normalized with them, the gradient sums, dx, dweight and dbias.

The cases cover rows of 2 to 15 values, groups of one and two blocks with remainders (channel
counts that leave 1 to 7 channels in the last block), one and two threads, the three kinds of
data of compare_builds.py for x (normal; 1e3 ± 0.01; NaN, inf and 3e38 values), and dy both
normal and at 1e3 ± 0.01, where the centred backward's shift of dy is not 0 and the sums of
dy - shift and of (dy - shift)·(x - mean) differ from those of dy. Each walk runs in a process of
its own: the walk bounds (BNLAB_NCL_*) are read once per process.
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
# (300, 24, 5) and (128, 70, 4): 2^15 values or more, so two threads share them
SHAPES = [(6, 70, 5), (40, 37, 3), (33, 20, 10), (17, 13, 15), (64, 11, 9), (50, 3, 2), (300, 24, 5), (128, 70, 4)]

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from compare_builds import make, run
    from bnlab.backends import cpu_build
    lib = cpu_build.load()
    digests = {}
    for shape in json.loads(sys.argv[2]):
        for data in ("normal", "offset", "nonfinite"):
            x = make(tuple(shape), torch.float32, data, 1, False)
            for dy_data in ("normal", "offset"):
                dy = make(tuple(shape), torch.float32, dy_data, 2, False)
                for centred in (1, 0):
                    for nt in (1, 2):
                        for name, t in run(lib, x, dy, nt, (centred,)).items():
                            t = t.masked_fill(torch.isnan(t), float("nan"))  # any NaN as any NaN
                            key = f"{name} {tuple(shape)} x={data} dy={dy_data} centred={centred} threads={nt}"
                            digests[key] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
    print(json.dumps(digests))
    """
)

# Every input by channel (or waves of channels), flat (statistics and gradient sums by blocks of
# samples x channels in memory order), and by channel groups of at most 1 MiB.
WALKS = {
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


@pytest.mark.parametrize("walk", ["flat", "groups"])
def test_short_rows_summed_across_channels_give_the_per_channel_walks_bits(walk, by_channel):
    across = walk_digests(walk)
    # 8 shapes x 3 kinds of x x 2 of dy x centred or not x 2 thread counts, 12 results each
    assert len(across) == len(by_channel) == len(SHAPES) * 3 * 2 * 2 * 2 * 12
    differ = [key for key, digest in across.items() if by_channel[key] != digest]
    assert not differ, f"{len(differ)} of {len(across)} results differ, e.g. {differ[:8]}"
