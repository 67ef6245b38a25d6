"""The eval-mode backward (frozen BN) in one pass against the two kernels it replaced, interleaved.

Claim measured (docs/benchmark_rounds.md, twelfth session): where the parameter sums walk by channel
(the large NCL inputs), ``bn_eval_backward`` reads dy and x once, writing dx as it goes (3N bytes),
where the earlier eval backward ran ``bn_normalize`` on dy (dx) and then ``bn_backward``'s reduction
over dy and x (5N). Contenders, all kernel calls into outputs allocated once, on the same tensors:
the one call, the two kernels, and ``copy_`` of x (2N bytes: the ceiling's unit). Timed as
bench_bn.py times its contenders (bench_bn.time_interleaved); prints medians in milliseconds and
the two kernels' time over the one call's.

The DRAM-sized shapes (the first three by default) do not fit the caches, so each call finds dy
and x in memory whatever ran before; the cache-resident ones (the last two) take the two kernels
in both contenders (their sums walk flat blocks) and show the cost of the choice itself.

    PYTHONPATH=src python benchmarks/eval_backward_ab.py [--shapes 32,64,56,56 64,256,14,14] [--layout cl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import time_interleaved  # noqa: E402
from bench_cases import make_input, nchw_shape, positive_int  # noqa: E402

from bnlab.backends import get_backend  # noqa: E402
from bnlab.backends.cpu import WAVE_PER_THREAD, _CODE, layout_of  # noqa: E402


def contenders(shape, layout: str, threads: int) -> dict:
    """{name: zero-argument callable}: the one call, the two kernels, copy_ (float32 tensors)."""
    lib = get_backend("cpu").kernels()
    x, dy = make_input(shape, layout, torch.float32, "cpu"), make_input(shape, layout, torch.float32, "cpu", seed=1)
    lay, n, c, length = layout_of(x)
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    invstd = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    weight, zeros = torch.randn(c, generator=gen), torch.zeros(c, dtype=torch.float64)
    dx, dw, db, dst = torch.empty_like(x), torch.empty(c), torch.empty(c), torch.empty_like(x)
    f32, wave = _CODE[torch.float32], WAVE_PER_THREAD * threads
    def one_call():
        lib.bn_eval_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), f32, lay, n, c, length, mean.data_ptr(),
                             invstd.data_ptr(), weight.data_ptr(), f32, dw.data_ptr(), f32, db.data_ptr(), f32,
                             threads, wave)  # fmt: skip

    def two_kernels():
        lib.bn_normalize(dy.data_ptr(), dx.data_ptr(), f32, lay, n, c, length, zeros.data_ptr(), invstd.data_ptr(),
                         weight.data_ptr(), f32, 0, 0, threads)  # fmt: skip
        lib.bn_backward(dy.data_ptr(), x.data_ptr(), 0, f32, lay, n, c, length, mean.data_ptr(), invstd.data_ptr(),
                        weight.data_ptr(), f32, float(n * length), 0, dw.data_ptr(), f32, db.data_ptr(), f32, threads,
                        wave, 0)  # fmt: skip

    def copy():
        dst.copy_(x)

    return {"one call": one_call, "two kernels": two_kernels, "copy_": copy}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=nchw_shape, default=[(32, 64, 56, 56), (256, 64, 32, 32),
                   (128, 256, 14, 14), (64, 256, 14, 14), (128, 16, 32, 32)])  # fmt: skip
    p.add_argument("--layout", default="nchw", choices=["nchw", "cl"])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=15)
    p.add_argument("--min-sample", type=float, default=0.05, help="seconds per sample (calls are repeated)")
    args = p.parse_args(argv)
    if get_backend("cpu").kernels() is None:
        raise SystemExit("bnlab's CPU kernels are unavailable (the extension module did not build)")
    torch.set_num_threads(args.threads)
    print(f"# eval_backward_ab.py --layout {args.layout} --threads {args.threads} --rounds {args.rounds}"
          "; milliseconds, medians")  # fmt: skip
    print(f"{'shape':20s} {'one call':>9s} {'two kernels':>12s} {'copy_':>8s} {'two/one':>8s}")
    for shape in args.shapes:
        fns = contenders(shape, args.layout, args.threads)
        t = time_interleaved(fns, "cpu", args.rounds, args.min_sample)
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"{str(shape):20s} {ms['one call']:9.3f} {ms['two kernels']:12.3f} {ms['copy_']:8.3f} "
              f"{ms['two kernels'] / ms['one call']:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
