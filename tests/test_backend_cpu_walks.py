"""The CPU kernels' alternative walks, each against the float64 reference.

Both layouts choose how to walk a tensor by its size, against bounds read once per process:

* NLC (rows of C channels, cpu_kernels_nlc*.inc): inputs below BNLAB_NLC_GROUP_MAX_BYTES (half the
  last-level cache) have their statistics and gradient sums walked by channel groups, larger ones
  row by row; rows of 8 to 64 channels in steps of 8 take neither, but one pass with the sums in
  registers (test_backend_cpu_register_rows.py holds it to the other walks' bits).
* NCL ((N, C, L), cpu_kernels_ncl_flat.inc): inputs below BNLAB_NCL_FLAT_MAX_BYTES run the
  statistics or gradient sums first (in memory order, by blocks of samples x channels, when
  rows are shorter than 2048 values; the statistics only with at least 4 channels per thread),
  then the elementwise pass in memory order;
  larger ones run each channel (or, with few channels, each wave of channels) fused, sums then
  elementwise pass while its rows are in L2. Before either, rows shorter than 2048 values of at
  least 4 adjacent channels per group (cpu_kernels_ncl_groups.inc) take the fused walk by channel
  groups of at most BNLAB_NCL_GROUP_BYTES (0: never).

The suite's tensors are small, so they take the cache-resident walks; here the bounds send every
input to one walk (WALKS below), in fresh processes, with two threads (tensors of 2^15 values or
more use both: by channel, or by waves of channels when there are fewer than 4 per thread).
Every output, gradient and statistic is compared with the float64 reference, in float32 and
bfloat16 (NCL also float64 and float16), on shapes that reach every branch (group sizes and
remainders, many and few channels, chunks of several rows with a short last one, rows of 2048
values or more) and on data at 1e3 ± 0.01 (the shifted sums' precision rule). Every NCL walk
computes the same statistics and the same coefficients, so their forward outputs must agree to
the bit, and the channel groups keep the per-channel walk's gradient sums, so their backward
must too; the script prints digests of both for that. (The flat walk's memory-order statistics
sum the same chunks in the same order as the per-channel walk, so the forward digest covers them.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch
    from bnlab import reference as ref
    from bnlab.backends import get_backend
    sys.path.insert(0, sys.argv[1])
    from speed_helpers import make_input, np64, rel_err
    cpu = get_backend("cpu")
    cases = {
        "nlc": [((300, 100), "nchw", 0.5, 2.0), ((33, 40), "nchw", 0.5, 2.0), ((40, 16, 3, 3), "cl", 0.5, 2.0),
                ((4100, 10), "nchw", 0.5, 2.0), ((9, 24, 13), "cl", 0.5, 2.0), ((600, 72), "nchw", 1000.0, 0.01)],
        "ncl": [((64, 40, 14, 14), "nchw", 0.5, 2.0), ((23, 3, 10, 10), "nchw", 0.5, 2.0), ((6, 70, 5), "nchw", 0.5, 2.0),
                ((5, 8, 50, 50), "nchw", 0.5, 2.0), ((37, 17, 9, 9), "nchw", 1000.0, 0.01), ((300, 3, 2), "nchw", 0.5, 2.0),
                ((400, 3, 40), "nchw", 0.5, 2.0), ((16, 100, 7, 7), "nchw", 0.5, 2.0), ((6, 130, 30), "nchw", 1000.0, 0.01),
                ((1500, 64, 3), "nchw", 0.5, 2.0)],
    }[sys.argv[2]]
    torch.set_num_threads(2)
    worst, digest, grads = {}, hashlib.sha256(), hashlib.sha256()
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float64, torch.float16) if sys.argv[2] == "ncl" else ())
    for dtype in dtypes:
        for shape, layout, mean, std in cases:
            if dtype in (torch.bfloat16, torch.float16) and mean == 1000.0:
                continue  # bf16 holds 1e3 ± 0.01 as a constant
            x = make_input(shape, layout, dtype, seed=1, mean=mean, std=std)
            dy = make_input(shape, layout, dtype, seed=2)
            y, stats, invstd = cpu.forward_train(x, None, None, 1e-5)
            dx, dw, db = cpu.backward(dy, x, stats.mean, invstd, None, stats.count, True)
            digest.update(y.float().contiguous().numpy().tobytes())
            digest.update(stats.mean.numpy().tobytes() + stats.m2.numpy().tobytes())
            grads.update(dx.float().contiguous().numpy().tobytes() + dw.numpy().tobytes() + db.numpy().tobytes())
            ey, cache = ref.forward_train(np64(x))
            edx, edw, edb = ref.backward(np64(dy), cache)
            n = x.numel() // shape[1]
            # each dtype's tolerance mapped onto float32's 2e-4: bf16 2e-2, fp16 4e-3, fp64 1e-9
            scale = 2e-4 / {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-9}[dtype]
            worst[f"{shape} {dtype}"] = scale * max(
                rel_err(y, ey), rel_err(dx, edx), rel_err(dw / n, edw / n), rel_err(db / n, edb / n),
                rel_err(stats.m2 / stats.count / torch.as_tensor(cache.var), torch.ones(shape[1])) * 100,
            )
    print(max(worst.values()), digest.hexdigest(), grads.hexdigest(), worst)
    """
)

# The bounds of each walk: 0 sends every input to the large-tensor walk, 2^40 to the small-tensor
# one. NCL has three walks: by channel (or waves), flat, and channel groups (cpu_kernels_ncl_groups.inc,
# chosen first wherever at least 4 adjacent channels of short rows fit the group budget, which
# the groups setting fixes at 1 MiB rather than half of whatever L2 the machine has).
WALKS = {
    "nlc": {"rows": {"BNLAB_NLC_GROUP_MAX_BYTES": 0}, "groups": {"BNLAB_NLC_GROUP_MAX_BYTES": 1 << 40}},
    "ncl": {
        "channels": {"BNLAB_NCL_FLAT_MAX_BYTES": 0, "BNLAB_NCL_GROUP_BYTES": 0},
        "flat": {"BNLAB_NCL_FLAT_MAX_BYTES": 1 << 40, "BNLAB_NCL_GROUP_BYTES": 0},
        "groups": {"BNLAB_NCL_FLAT_MAX_BYTES": 0, "BNLAB_NCL_GROUP_BYTES": 1 << 20},
    },
}


def run_walk(layout: str, bounds: dict) -> tuple[float, str, str]:
    """(worst error, forward digest, backward digest) of the script under the given bounds."""
    env = dict(os.environ, OMP_NUM_THREADS="2", **{k: str(v) for k, v in bounds.items()})
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, here, layout], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    worst, digest, grads = out.stdout.split()[:3]
    return float(worst), digest, grads


@pytest.mark.parametrize("layout", ["nlc", "ncl"])
def test_every_walk_matches_the_float64_reference(layout):
    results = {name: run_walk(layout, bounds) for name, bounds in WALKS[layout].items()}
    # fp32 within 2e-4 of float64, the variance within 2e-6 (scaled by 100 above); bf16 within 2e-2
    for name, (worst, _, _) in results.items():
        assert worst <= 2e-4, (name, results[name])
    if layout == "nlc":
        # The NLC walks (and the register walk of rows of 8 to 64 channels, which both take for
        # (33, 40), (40, 16, 3, 3) and (9, 24, 13)) perform the same operations per channel in the same
        # order: forward and backward agree to the bit.
        assert results["rows"][1:] == results["groups"][1:], results
    if layout == "ncl":
        # Every NCL walk computes the same statistics and coefficients in the same order: the
        # forward agrees to the bit; the channel groups keep the per-channel walk's gradient sums
        # too, so their backward does as well.
        assert len({digest for _, digest, _ in results.values()}) == 1, results
        assert results["groups"][2] == results["channels"][2], results


# The elementwise pass after a reduction walks each thread's share back from the part the
# reduction read last (NLC rows in 64 KiB blocks, row_blocks_last_first; the per-channel walk's
# channels and chunks, ncl_normalize_channels and ncl_grad_input_channels) where the share
# exceeds BNLAB_LAST_FIRST_MIN_BYTES: by default the L2 on Intel CPUs with AVX-512, never
# elsewhere, and the suite's tensors are smaller than any L2. At 0 every share walks back. An
# elementwise pass computes each value alone, so its order must not change a bit: both runs must
# print the same digests. The NLC shapes (4100, 10) and (600, 72) give each thread two blocks in
# float32 (bf16 rows make one block of (4100, 10) per thread); the NCL flat setting sends
# (5, 8, 50, 50), rows of 2500 values, through the per-channel walk's two passes.
@pytest.mark.parametrize("layout,walk", [("nlc", "rows"), ("nlc", "groups"), ("ncl", "flat")])
def test_second_passes_walked_back_give_the_same_bits(layout, walk):
    in_order = run_walk(layout, {**WALKS[layout][walk], "BNLAB_LAST_FIRST_MIN_BYTES": 1 << 40})
    walked_back = run_walk(layout, {**WALKS[layout][walk], "BNLAB_LAST_FIRST_MIN_BYTES": 0})
    assert in_order[0] <= 2e-4, in_order
    assert walked_back == in_order
