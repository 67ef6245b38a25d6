"""Rows of 8 to 64 channels (in steps of 8) keep their reductions' run sums in registers.

The NLC kernels (channels-last activations and (N, C) inputs) walk the statistics and the
gradient sums of such rows once per run of rows, every channel's sums in registers
(cpu_kernels_nlc_rows.inc, with_register_rows); other widths take the channel groups (inputs
below half the last-level cache) or the row-by-row walk (beyond it). All walks perform the same
operations per channel in the same order, and a channel's results depend on its own values only.
So the first C channels of an input of C + 1 channels, which takes one of the other walks, must
give to the bit what those C channels give alone: the output, mean, M2, invstd, dx, dweight and
dbias of the training forward and backward, and dx, dweight and dbias of the eval-mode backward
(bn_eval_backward, whose rows beyond the group walk's bound are walked fused). Checked in a fresh
process under each of the other walks' bounds, in four dtypes, with one and two threads, on
normal data and on data at 1e3 ± 0.01 (where the shifted sums matter).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from bnlab.backends import get_backend

pytestmark = pytest.mark.skipif(get_backend("cpu").kernels() is None, reason="the CPU kernels did not build")

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from bnlab.backends import get_backend
    sys.path.insert(0, sys.argv[1])
    from speed_helpers import make_input
    cpu = get_backend("cpu")
    torch.set_num_threads(2)

    def results(x, dy, c):
        # every result of the kernels for x (N, C', ...) with C' >= c, narrowed to the first c channels
        weight, bias = WEIGHT[: x.shape[1]].contiguous(), BIAS[: x.shape[1]].contiguous()
        y, stats, invstd = cpu.forward_train(x, weight, bias, 1e-5)
        dx, dw, db = cpu.backward(dy, x, stats.mean, invstd, weight, stats.count, True)
        edx, edw, edb = cpu.eval_backward(dy, x, weight, stats.mean, invstd, True, True, True, torch.float32)
        channels = {"y": y, "dx": dx, "eval dx": edx}
        per_channel = {"mean": stats.mean, "M2": stats.m2, "invstd": invstd, "dweight": dw, "dbias": db,
                       "eval dweight": edw, "eval dbias": edb}
        out = {k: v.narrow(1, 0, c) for k, v in channels.items()}
        return {**out, **{k: v[:c] for k, v in per_channel.items()}}

    gen = torch.Generator().manual_seed(3)
    WEIGHT, BIAS = torch.rand(65, generator=gen) + 0.5, torch.randn(65, generator=gen)
    differ, compared = [], 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # (4100, C): two threads for every C; (3, C, 5, 7) channels-last: one thread
        for c in range(8, 65, 8):
            for shape, layout in (((4100, c + 1), "nchw"), ((3, c + 1, 5, 7), "cl")):
                for mean, std in ((0.0, 1.0), (1000.0, 0.01)):
                    if mean and dtype in (torch.bfloat16, torch.float16):
                        continue  # 16-bit values hold 1e3 ± 0.01 as a constant
                    wide = make_input(shape, layout, dtype, seed=1, mean=mean, std=std)
                    dy_wide = make_input(shape, layout, dtype, seed=2)
                    # the first c channels alone, in the same layout (channels innermost for cl)
                    alone, dy_alone = (t.narrow(1, 0, c).clone(memory_format=torch.preserve_format) for t in (wide, dy_wide))
                    assert alone.is_contiguous(memory_format=torch.channels_last) == (layout == "cl")
                    a, b = results(alone, dy_alone, c), results(wide, dy_wide, c)
                    for k in a:
                        compared += 1
                        if not torch.equal(a[k], b[k]):
                            differ.append(f"{k} of {shape} {layout} {dtype} data {mean} ± {std}")
    print(compared, len(differ), differ[:10])
    """
)

# The other walks' bounds (cpu_kernels_nlc_rows.inc, nlc_group_walk): the suite's inputs are
# below half any last-level cache, so by default C + 1 channels take the channel groups; at 0 they
# take the row-by-row walk, and the eval-mode backward its fused walk of the rows.
BOUNDS = {"groups": {}, "rows": {"BNLAB_NLC_GROUP_MAX_BYTES": "0"}}


@pytest.mark.parametrize("walk", list(BOUNDS))
def test_register_rows_give_the_bits_of_the_other_walks(walk):
    env = dict(os.environ, OMP_NUM_THREADS="2", **BOUNDS[walk])
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", SCRIPT, here], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    compared, differ = out.stdout.split(maxsplit=2)[:2]
    # 8 widths x 2 shapes: 6 cases per width in float32 and float64, 4 in bf16 and float16; 10 results each
    assert int(compared) == 8 * 2 * (2 + 2 + 1 + 1) * 10, out.stdout
    assert int(differ) == 0, out.stdout
