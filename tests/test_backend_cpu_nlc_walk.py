"""The NLC kernels' two walks over rows of C channels (cpu_kernels_nlc.inc, nlc_group_walk).

Inputs below half the last-level cache have their statistics and gradient sums walked by channel
groups (sums in registers); larger ones row by row. BNLAB_NLC_GROUP_MAX_BYTES=0 makes every input
take the row walk, so small tensors reach that code here. Each walk runs in a fresh process (the
bound is read once per process) and is compared with the float64 reference: outputs, gradients
and statistics, on channel widths that exercise every group size and the scalar remainder, and on
data at 1e3 ± 0.01 (the shifted float32 sums' precision rule).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from bnlab import reference as ref
    from bnlab.backends import get_backend
    sys.path.insert(0, sys.argv[1])
    from speed_helpers import make_input, np64, rel_err
    cpu = get_backend("cpu")
    worst = {}
    for shape, layout, mean, std in [
        ((300, 100), "nchw", 0.5, 2.0), ((33, 40), "nchw", 0.5, 2.0), ((40, 16, 3, 3), "cl", 0.5, 2.0),
        ((4100, 10), "nchw", 0.5, 2.0), ((9, 24, 13), "cl", 0.5, 2.0), ((600, 72), "nchw", 1000.0, 0.01),
    ]:
        x = make_input(shape, layout, torch.float32, seed=1, mean=mean, std=std)
        dy = make_input(shape, layout, torch.float32, seed=2)
        y, stats, invstd = cpu.forward_train(x, None, None, 1e-5)
        dx, dw, db = cpu.backward(dy, x, stats.mean, invstd, None, stats.count, True)
        ey, cache = ref.forward_train(np64(x))
        edx, edw, edb = ref.backward(np64(dy), cache)
        n = x.numel() // shape[1]
        worst[str(shape)] = max(
            rel_err(y, ey), rel_err(dx, edx), rel_err(dw / n, edw / n), rel_err(db / n, edb / n),
            rel_err(stats.m2 / stats.count / torch.as_tensor(cache.var), torch.ones(shape[1])) * 100,
        )
    print(max(worst.values()), worst)
    """
)


@pytest.mark.parametrize("walk", ["rows", "groups"])
def test_both_nlc_walks_match_the_float64_reference(walk):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env["BNLAB_NLC_GROUP_MAX_BYTES"] = "0" if walk == "rows" else str(1 << 40)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", SCRIPT, here], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    worst = float(out.stdout.split()[0])
    assert worst <= 2e-4, out.stdout  # variance within 2e-6 of float64 (scaled by 100 above)
