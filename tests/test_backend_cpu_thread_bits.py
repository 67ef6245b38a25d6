"""Results do not depend on the thread count: NLC inputs (channels-last, (N, C)) and NCL ones of few channels.

The general NLC walks (cpu_kernels_nlc_forward.inc, _backward.inc) used to give each thread a share of the rows and
reduce it as one sequence, so that from 17 rows up the statistics and gradient sums, and all that
follows from them, moved with the thread count (NCL inputs never did). Now the forward reduces
segments of rows fixed by the row count alone and folds them in order, and the backward adds up
leaves of rows in a fixed binary tree (cpu_kernels_nlc_tree.inc): every result must have the
one-thread bits on two and three threads. The cases reach the forward's whole segments and its
blocks of channels, the backward's leaves of two and of four runs, widths taken in registers, by
channel groups with a remainder and row by row (BNLAB_NLC_GROUP_MAX_BYTES=0, read once per
process: hence a process per setting), and the eval-mode backward's fused walk beyond that bound,
in four dtypes and compare_builds.py's three kinds of data (normal; 1e3 ± 0.01; NaN, inf and
3e38 values).

NCL inputs of too few channels to give each thread whole channels are walked in waves of chunks
shared among the threads (cpu_kernels_waves.inc), whose partial statistics were merged in thread
order: inputs of 3 to 8 channels moved with the thread count too. Each chunk's statistics are now
merged in chunk order.

The channel groups' remainder of fewer than 8 channels is summed as the last 8 channels' group,
of which only those channels' sums are kept; the test below holds it to the single channels'
sums that a row of fewer than 8 channels takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnlab.backends import get_backend

pytestmark = pytest.mark.skipif(get_backend("cpu").kernels() is None, reason="the CPU kernels did not build")

ROOT = Path(__file__).resolve().parents[1]

# (9000, 40): 9 segments, whole segments to each of two threads, blocks of channels on three;
# (3000, 100), (300, 200), (2500, 300), (17, 2048): fewer segments than four a thread, blocks of
# channels from two threads up, remainders of 4 and 8 channels; leaves of four runs from 512 rows
# up, of two below (one, part of a leaf, for 17 rows), the backward by channels for (17, 2048) on
# two threads and (300, 200) on three; (1100, 9): one channel past a group of 8; channels-last
# (8, 64, 20, 20) and (4, 24, 30, 30): rows in registers, whole or in blocks.
SHAPES = [
    (9000, 40), (3000, 100), (300, 200), (2500, 300), (17, 2048), (1100, 9), (8, 64, 20, 20), (4, 24, 30, 30),
]  # fmt: skip
THREADS = [1, 2, 3]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from compare_builds import inputs, run, same_bits
    from bnlab.backends import cpu_build
    from bnlab.backends.cpu import WAVE_PER_THREAD, _CODE, layout_of
    lib = cpu_build.load()

    def eval_backward(x, dy, nt):
        # bn_eval_backward from fixed statistics: dx, dweight, dbias
        lay, n, c, length = layout_of(x)
        gen = torch.Generator().manual_seed(11)
        stats = torch.stack([torch.randn(c, generator=gen, dtype=torch.float64),
                             torch.rand(c, generator=gen, dtype=torch.float64) + 0.5])
        w, dw, db, dx = torch.rand(c, generator=gen) + 0.5, torch.empty(c), torch.empty(c), torch.empty_like(x)
        f32, p = _CODE[torch.float32], stats.data_ptr()
        lib.bn_eval_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), _CODE[x.dtype], lay, n, c, length, p,
                             p + 8 * c, w.data_ptr(), f32, dw.data_ptr(), f32, db.data_ptr(), f32, nt,
                             WAVE_PER_THREAD * nt)
        return {"eval dx": dx, "eval dweight": dw, "eval dbias": db}

    differ, compared = [], 0
    threads = json.loads(sys.argv[3])
    for shape, dtype, data, x, dy in inputs(json.loads(sys.argv[2])):
        for centred in ((1,), (0,)):
            first = None
            for nt in threads:
                got = {**run(lib, x, dy, nt, centred), **eval_backward(x, dy, nt)}
                if first is None:
                    first = got
                    continue
                for name, t in got.items():
                    compared += 1
                    if not same_bits(t, first[name]):
                        differ.append(f"{name} {shape} {dtype} {data} centred={centred[0]} threads={nt}")
    print(json.dumps({"compared": compared, "differ": differ}))
    """
)

# Where the suite's small inputs walk by channel groups (the default bound, half the last-level
# cache), and where every input walks row by row, the eval-mode backward fused (bound 0).
BOUNDS = {"groups": {}, "rows": {"BNLAB_NLC_GROUP_MAX_BYTES": "0"}}


@pytest.mark.parametrize("walk", list(BOUNDS))
def test_every_nlc_result_has_the_one_thread_bits_on_two_and_three_threads(walk):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_NLC_")}
    env.update(BOUNDS[walk])
    argv = [sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks"), json.dumps(SHAPES), json.dumps(THREADS)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # 10 dtype-data pairs, centred or not, 3 thread counts against the first, 15 results each
    assert out["compared"] == len(SHAPES) * 10 * 2 * (len(THREADS) - 1) * 15
    assert not out["differ"], f"{len(out['differ'])} results differ, e.g. {out['differ'][:8]}"


@pytest.mark.parametrize("width", [9, 13, 15, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_remainder_of_the_channel_groups_has_the_bits_of_single_channels(width, dtype, keep_threads):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_builds import make, run

    lib = get_backend("cpu").kernels()
    tail = width % 8
    x, dy = make((200, width), dtype, "normal", 1, False), make((200, width), dtype, "normal", 2, False)
    alone = [t[:, width - tail :].contiguous() for t in (x, dy)]  # fewer than 8 channels: one at a time
    for nt in (1, 2):
        whole, part = run(lib, x, dy, nt), run(lib, *alone, nt)
        # the per-channel parameters and running averages differ between the two calls (drawn for
        # each width): compare what depends on the data alone
        for name in ("mean", "M2", "invstd", "sum_dy", "sum_dy_xhat", "dweight", "dbias"):
            assert torch.equal(whole[name][width - tail :], part[name]), (name, nt)


# NCL shapes that the waves walk takes on two to four threads ((64, 8, 14, 14) on three), and whose
# results differed between thread counts before each chunk's statistics were kept apart
WAVE_SHAPES = [(8, 3, 1600), (2, 5, 2304), (4, 8, 64, 64), (64, 8, 14, 14)]


@pytest.mark.parametrize("shape", WAVE_SHAPES)
def test_ncl_waves_have_the_one_thread_bits_on_two_to_four_threads(shape, keep_threads):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_builds import dtype_data, make, run, same_bits

    lib = get_backend("cpu").kernels()
    differ = []
    for dtype, data in dtype_data():
        x, dy = make(shape, dtype, data, 1, False), make(shape, dtype, "normal", 2, False)
        for centred in ((1,), (0,)):
            first = run(lib, x, dy, 1, centred)
            for nt in (2, 3, 4):
                got = run(lib, x, dy, nt, centred)
                differ += [f"{name} {dtype} {data} centred={centred[0]} threads={nt}" for name in got
                           if not same_bits(got[name], first[name])]
    assert not differ, f"{len(differ)} results differ, e.g. {differ[:8]}"
