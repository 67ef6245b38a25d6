"""Calls with at most 16 rows of channels (NLC: (N, C) inputs, and channels-last ones with
N·H·W <= 16) take the narrow walks of cpu_kernels_nlc_forward.inc and cpu_kernels_nlc_backward.inc
(nlc_forward_narrow, nlc_backward_narrow): blocks of 256 channels through the whole per-channel work at once, where the
general walks make C-long passes through per-thread arrays; on several threads the narrow walks
split the channels, not the rows. Each channel gets the operations of the general walks on one
thread, in the same order, so every result must have their one-thread bits, on one to three
threads. BNLAB_NLC_NARROW_MAX_BYTES=0 sends every call to the general walks; the kernels read it
once per process, so each side runs in a process of its own, over benchmarks/compare_builds.py's
results (eval, the training forward with its statistics and running averages, the backward with
its sums and parameter gradients), centred and not, four dtypes, and its three kinds of data
(normal; 1e3 ± 0.01; NaN, inf and 3e38 values, NaNs of other signs and payloads among them)."""

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

# Rows 1 to 16; channels in whole blocks of 256 and with remainders, widths that the general walk
# takes with its sums in registers (8 to 64 in steps of 8), odd widths; channels-last (N, C, H, W).
SHAPES = [
    (1, 40), (2, 1000), (3, 300), (5, 33), (16, 520), (7, 8), (4, 64), (9, 112), (16, 17), (2, 512),
    (1, 24, 3, 3), (2, 16, 2, 2), (3, 300, 1, 5), (3, 2060),
]  # fmt: skip
# (3, 2060): from 2048 channels the centred backward's dy shifts are split over the threads too
# (cpu_kernels_grad_shifts.inc, kParallelShiftChannels), in shares of 8 channels with a remainder

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from compare_builds import bits_digest, inputs, run
    from bnlab.backends import cpu_build
    lib = cpu_build.load()
    out = {}
    for shape, dtype, data, x, dy in inputs(json.loads(sys.argv[2])):
        for centred in ((1,), (0,)):
            for nt in json.loads(sys.argv[3]):
                for name, t in run(lib, x, dy, nt, centred).items():
                    key = f"{shape} {dtype} {data} centred={centred[0]} {name}"
                    out[f"{key} threads={nt}"] = bits_digest(t)  # any NaN as any NaN
    print(json.dumps(out))
    """
)


def _digests(narrow_bound: str | None, threads: list[int]) -> dict:
    """{case and result name: digest} of every case on each of ``threads``, keys ending " threads=N"."""
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_NLC_NARROW_MAX_BYTES"}
    if narrow_bound is not None:
        env["BNLAB_NLC_NARROW_MAX_BYTES"] = narrow_bound
    argv = [sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks"), json.dumps(SHAPES), json.dumps(threads)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_narrow_walks_have_the_general_walks_bits_on_one_thread_whatever_their_threads():
    # The general walk on 2-3 threads splits the rows into blocks merged per channel, other sums
    # than on one; the narrow walks split the channels, each summed as on one thread.
    # three threads first in each case: a channel a walk left out would keep the last case's values
    narrow, general = _digests(None, [3, 2, 1]), _digests("0", [1])
    assert len(general) == len(SHAPES) * 10 * 2 * 12  # 10 dtype-data pairs, centred or not, 12 results
    differ = []
    for threads in (1, 2, 3):
        for key, digest in general.items():
            narrow_key = key.replace(" threads=1", f" threads={threads}")
            if narrow[narrow_key] != digest:
                differ.append(narrow_key)
    assert not differ, f"{len(differ)} results differ, e.g. {differ[:8]}"
