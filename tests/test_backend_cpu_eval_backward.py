"""bn_eval_backward: the first-order backward of eval-mode BN (fixed statistics) in one kernel call.

dx = dy·(weight·invstd) does not depend on the parameter sums in eval mode, so where the sums walk
by channel (NCL inputs that take neither channel groups nor flat blocks: rows of 2048 values or
more, and the large inputs) over rows of 4 KiB or more, or walk rows of C channels one by one or,
for 8-64 channels, in registers (channels-last and (N, C) inputs beyond the group walk's bound),
one pass computes both
(ncl_eval_backward_channels, nlc_eval_backward). The oracle for
its bits is what the eval backward ran before, two kernels: bn_normalize on dy with mean 0 and no
bias, then bn_backward's reduction. Every case must equal that to the bit (dx, dweight, dbias in
their dtypes) and the float64 formula within the dtype's tolerance, for each subset of outputs
wanted, one and two threads, both layouts and four dtypes; in a fresh process with the walk
bounds that send every input to the walks of large inputs too (NCL rows of 1024 float32 values
in chunks of two rows with a short last chunk; rows of C channels in blocks of whole runs, with
odd C, several blocks per thread and a short last one).
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
    import itertools, sys, torch
    from bnlab.backends import get_backend
    from bnlab.backends.cpu import _CODE, WAVE_PER_THREAD, layout_of
    sys.path.insert(0, sys.argv[1])
    from speed_helpers import make_input, rel_err
    lib = get_backend("cpu").kernels()
    TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    cases = [((2, 8, 48, 48), "nchw"), ((3, 9, 2100), "nchw"), ((4, 16, 5, 7), "nchw"), ((37, 17, 9, 9), "nchw"),
             ((5, 3, 50, 50), "nchw"), ((2, 8, 48, 48), "cl"), ((300, 24), "nchw"), ((64, 20, 14, 14), "nchw"),
             ((5, 8, 32, 32), "nchw"), ((3, 8, 1500), "nchw"), ((40, 17, 3, 3), "cl"), ((4100, 10), "nchw"),
             ((700, 64), "nchw")]
    checked = 0
    for dtype, (shape, memory), nt in itertools.product(TOL, cases, (1, 2)):
        x = make_input(shape, memory, dtype, seed=1, mean=3.0)
        dy = make_input(shape, memory, dtype, seed=2)
        c = shape[1]
        gen = torch.Generator().manual_seed(3)
        mean = torch.randn(c, generator=gen, dtype=torch.float64) + 3.0
        invstd = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        weight = torch.randn(c, generator=gen).to(dtype if dtype == torch.float64 else torch.float32)
        lay, n, ch, length = layout_of(x)
        code = _CODE[dtype]
        for want_dx, want_dw, want_db in [(1, 1, 1), (1, 0, 0), (0, 1, 1), (1, 0, 1)]:
            outs = {}
            for path in ("one call", "two kernels"):
                dx = torch.empty_like(x) if want_dx else None
                dw = torch.empty_like(weight) if want_dw else None
                db = torch.empty(c, dtype=weight.dtype) if want_db else None
                ptr = lambda t: 0 if t is None else t.data_ptr()
                cd = lambda t: 0 if t is None else _CODE[t.dtype]
                if path == "one call":
                    rc = lib.bn_eval_backward(dy.data_ptr(), x.data_ptr(), ptr(dx), code, lay, n, ch, length,
                                              mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(),
                                              _CODE[weight.dtype], ptr(dw), cd(dw), ptr(db), cd(db), nt,
                                              WAVE_PER_THREAD * nt)
                    assert rc == 0
                else:
                    zeros = torch.zeros(c, dtype=torch.float64)
                    if dx is not None:
                        lib.bn_normalize(dy.data_ptr(), dx.data_ptr(), code, lay, n, ch, length, zeros.data_ptr(),
                                         invstd.data_ptr(), weight.data_ptr(), _CODE[weight.dtype], 0, 0, nt)
                    if dw is not None or db is not None:
                        lib.bn_backward(dy.data_ptr(), x.data_ptr(), 0, code, lay, n, ch, length, mean.data_ptr(),
                                        invstd.data_ptr(), weight.data_ptr(), _CODE[weight.dtype], float(n * length),
                                        0, ptr(dw), cd(dw), ptr(db), cd(db), nt, WAVE_PER_THREAD * nt, 0)
                outs[path] = (dx, dw, db)
            for got, want in zip(outs["one call"], outs["two kernels"]):
                assert (got is None) == (want is None)
                if got is not None:
                    assert got.stride() == want.stride() and torch.equal(got, want), (shape, memory, dtype, nt)
            # the float64 formula
            view = [1, -1] + [1] * (x.dim() - 2)
            dx, dw, db = outs["one call"]
            d, v = dy.double(), x.double()
            if dx is not None:
                assert rel_err(dx, d * (invstd * weight.double()).view(view)) <= TOL[dtype], (shape, dtype)
            dims = [0] + list(range(2, x.dim()))
            if dw is not None:
                xhat = (v - mean.view(view)) * invstd.view(view)
                assert rel_err(dw, (d * xhat).sum(dims)) <= TOL[dtype] * x.numel() ** 0.5, (shape, dtype)
            if db is not None:
                assert rel_err(db, d.sum(dims)) <= TOL[dtype] * x.numel() ** 0.5, (shape, dtype)
            checked += 1
    print(checked)
    """
)

# Default bounds, then every input sent to the walks of large inputs: NCL by channel, rows of C
# channels one by one (tests/test_backend_cpu_walks.py).
BOUNDS = {
    "default": {},
    "large-input walks": {"BNLAB_NCL_FLAT_MAX_BYTES": 0, "BNLAB_NCL_GROUP_BYTES": 0, "BNLAB_NLC_GROUP_MAX_BYTES": 0},
}


@pytest.mark.parametrize("bounds", list(BOUNDS))
def test_one_call_has_the_bits_of_the_two_kernels_and_matches_float64(bounds):
    env = dict(os.environ, **{k: str(v) for k, v in BOUNDS[bounds].items()})
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", SCRIPT, here], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == 4 * 13 * 2 * 4  # dtypes x shapes x thread counts x output subsets
