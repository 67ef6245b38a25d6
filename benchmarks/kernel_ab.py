"""A/B of two builds of bnlab's CPU kernels: kernel calls alone, interleaved in one process.

Claim measured: how a kernel change moves the time of the kernel calls themselves (no Python
module, no allocation), e.g. "backward (64, 256, 14, 14) 1.42 -> 0.99 ms" in docs/benchmark_rounds.md.
Both libraries are loaded into this process and called on the same tensors, old and new
alternating sample by sample (the order flipping every sample), so a busy machine slows both
alike; each sample repeats the call for ~10 ms and the table shows medians.

The old build is the compiled module of another revision, which bnlab caches under its own key:

    git worktree add /tmp/bnlab-old 1665b19
    PYTHONPATH=/tmp/bnlab-old/src python -c \\
        "from bnlab.backends import cpu_build; cpu_build.load(); print(cpu_build.library_path())"
    PYTHONPATH=src python benchmarks/kernel_ab.py --old <the printed path>

--new puts another compiled module in place of this checkout's own build, e.g. two builds for
x86-64-v3 (AVX2), to see what a change costs on machines without AVX-512.

Cases are mode:shape:layout:dtype[:threads], mode one of fwd, stats (forward without output),
bwd, eval (the elementwise pass from given statistics, bn_normalize, with mean 0 and invstd 1),
running (eval from running buffers of random values, bn_eval: the per-channel square roots and
divisions too, whose time depends on the values; since the forty-first session computed once per
build and thread and then reused from the kept coefficients, cpu_kernels_eval_cache.inc, unless
BNLAB_EVAL_CACHE_BYTES=0), dx (the input gradient from given statistics
and sums, bn_grad_input), frozen (the eval-mode backward, bn_eval_backward: dx, dweight and
dbias from fixed statistics), train (fwd as a layer's training call makes it: float32 running
averages updated, the non-finite guard on, the batch counted; the averages drift over the calls);
layout nchw or cl; dtype fp32, bf16, fp16 or fp64; threads 2 unless given.

With --cold, every timed call follows a write of 256 MB elsewhere, so the call finds its tensors
in memory rather than in cache (as a layer's backward finds the tensors its forward touched,
after the rest of the network ran in between), and each sample is that one call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from bnlab.backends import cpu_build
from bnlab.backends.cpu import WAVE_PER_THREAD, _CODE, layout_of

MODES = ("fwd", "stats", "bwd", "eval", "running", "dx", "frozen", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DEFAULT_CASES = (
    "bwd:64,256,14,14:nchw:fp32",
    "bwd:128,16,32,32:nchw:fp32",
    "fwd:64,256,14,14:nchw:fp32",
    "fwd:128,16,32,32:nchw:fp32",
    "bwd:32,64,56,56:nchw:fp32",
    "eval:64,256,14,14:nchw:bf16",
    "eval:64,256,14,14:cl:bf16",
    "bwd:32,64,56,56:nchw:bf16",
    "fwd:32,64,56,56:nchw:bf16",
)


def parse_case(spec: str) -> tuple[str, tuple[int, ...], str, torch.dtype, int]:
    """(mode, shape, layout, dtype, threads) of a case spec; ValueError naming what is wrong."""
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise ValueError(f"case: expected mode:shape:layout:dtype[:threads], got {spec!r}")
    mode, shape_text, layout, dtype = parts[:4]
    if mode not in MODES:
        raise ValueError(f"case {spec!r}: mode expected one of {MODES}, got {mode!r}")
    try:
        shape = tuple(int(s) for s in shape_text.split(","))
        threads = int(parts[4]) if len(parts) == 5 else 2
    except ValueError:
        raise ValueError(
            f"case {spec!r}: expected comma-separated integers for the shape and an integer thread count"
        ) from None
    if len(shape) < 2 or min(shape) < 1 or threads < 1:
        raise ValueError(f"case {spec!r}: expected a shape of 2+ positive sizes and threads >= 1")
    if layout not in ("nchw", "cl") or (layout == "cl" and len(shape) != 4):
        raise ValueError(f"case {spec!r}: layout expected nchw, or cl for a 4-d shape, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"case {spec!r}: dtype expected one of {tuple(DTYPES)}, got {dtype!r}")
    return mode, shape, layout, DTYPES[dtype], threads


class KernelCalls(NamedTuple):
    """kernel_calls' result: the calls, one per library, and the tensors they read and write,
    (x, dy, out, stats) and the mode's extra inputs (each call keeps them alive too)."""

    calls: list
    tensors: tuple


def takes_centred(lib) -> bool:
    """Whether lib's bn_backward takes the last argument `centred` (builds from 2026-12-05 on; an
    older one's extension module takes 20 arguments). A ctypes library gets the declared argument
    types of this checkout, and an older one there ignores the extra int."""
    fn = lib.bn_backward
    if getattr(fn, "argtypes", None) is not None:
        return True
    try:
        fn()  # no kernel runs: the argument count is checked first
    except TypeError as exc:
        return "expected 20 " not in str(exc)
    return True


def kernel_calls(libs, mode: str, shape, layout: str, dtype: torch.dtype, nt: int) -> KernelCalls:
    """Zero-argument callables, one per library of `libs`, each running the case's kernel of its
    library on the same tensors, so that the builds differ in their code only, not in where their
    data lies. (Timed against an identical copy of itself, a build came out 0.80-1.16 until the
    kernels' scratch buffers were cache-line aligned, 0.99-1.01 since: placement matters.)"""
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    if layout == "cl":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    lay, n, c, length = layout_of(x)
    code, out = _CODE[dtype], torch.empty_like(x)
    stats = torch.zeros(3, c, dtype=torch.float64)
    stats[2] = 1.0  # invstd for the backward
    mean_ptr, invstd_ptr = stats.data_ptr(), stats.data_ptr() + 16 * c
    keep = (x, dy, out, stats)  # alive as long as the callables
    if mode in ("fwd", "stats"):
        y_ptr = out.data_ptr() if mode == "fwd" else 0
        args = (x.data_ptr(), y_ptr, code, lay, n, c, length, 0, 0, 0, 0, 1e-5, stats.data_ptr(), 0, 0, 0, 0,
                0.1, 0, False, False, nt, WAVE_PER_THREAD * nt)  # fmt: skip
        name = "bn_forward_train"
    elif mode == "train":
        running = torch.zeros(c), torch.ones(c)  # mean, var: float32, as a layer's
        counter = torch.zeros(1, dtype=torch.int64)
        keep += (*running, counter)
        f32 = _CODE[torch.float32]
        args = (x.data_ptr(), out.data_ptr(), code, lay, n, c, length, 0, 0, 0, 0, 1e-5, stats.data_ptr(),
                running[0].data_ptr(), f32, running[1].data_ptr(), f32, 0.1, counter.data_ptr(), False, True, nt,
                WAVE_PER_THREAD * nt)  # fmt: skip
        name = "bn_forward_train"
    elif mode == "bwd":
        args = (dy.data_ptr(), x.data_ptr(), out.data_ptr(), code, lay, n, c, length, mean_ptr, invstd_ptr, 0, 0,
                float(n * length), 0, 0, 0, 0, 0, nt, WAVE_PER_THREAD * nt)  # fmt: skip
        name = "bn_backward"
        # the training backward (the forward's batch mean: centred) where a build takes the flag
        per_lib = [args + ((1,) if takes_centred(lib) else ()) for lib in libs]
    elif mode == "dx":
        sums = torch.randn(2, c, generator=gen, dtype=torch.float64)  # Σdy, Σdy·x̂
        keep += (sums,)
        args = (dy.data_ptr(), x.data_ptr(), out.data_ptr(), code, lay, n, c, length, mean_ptr, invstd_ptr, 0, 0,
                sums.data_ptr(), sums.data_ptr() + 8 * c, float(n * length), nt)  # fmt: skip
        name = "bn_grad_input"
    elif mode == "frozen":
        params = torch.rand(3, c, generator=gen) + 0.5  # weight; dweight and dbias written
        keep += (params,)
        f32, p = _CODE[torch.float32], params.data_ptr()
        args = (dy.data_ptr(), x.data_ptr(), out.data_ptr(), code, lay, n, c, length, mean_ptr, invstd_ptr, p, f32,
                p + 4 * c, f32, p + 8 * c, f32, nt, WAVE_PER_THREAD * nt)  # fmt: skip
        name = "bn_eval_backward"
    elif mode == "running":
        running = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5  # mean, var
        affine = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)  # weight, bias
        keep += running + affine
        f32 = _CODE[torch.float32]
        ptrs = [t.data_ptr() for t in running + affine]
        args = (x.data_ptr(), out.data_ptr(), code, lay, n, c, length, ptrs[0], f32, ptrs[1], f32, ptrs[2], f32,
                ptrs[3], f32, 1e-5, nt)  # fmt: skip
        name = "bn_eval"
    else:
        args = (x.data_ptr(), out.data_ptr(), code, lay, n, c, length, mean_ptr, invstd_ptr, 0, 0, 0, 0, nt)
        name = "bn_normalize"
    if mode != "bwd":
        per_lib = [args] * len(libs)
    return KernelCalls([lambda fn=getattr(lib, name), a=a, keep=keep: fn(*a) for lib, a in zip(libs, per_lib)], keep)


def median_us(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


COLD_BYTES = 256 << 20  # larger than any last-level cache a core of the project's machines sees


def cold_us(fn, evict: torch.Tensor) -> float:
    """One call of fn, in microseconds, right after ``evict`` was overwritten."""
    evict.fill_(1.0)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def compare(old, new, spec: str, samples: int, evict: torch.Tensor | None = None) -> str:
    mode, shape, layout, dtype, nt = parse_case(spec)
    f_old, f_new = kernel_calls((old, new), mode, shape, layout, dtype, nt).calls
    f_old(), f_new()
    once = median_us(f_new, 3)
    reps = max(3, int(10_000 / max(once, 1.0)))
    t_old, t_new = [], []
    for i in range(samples):
        for which in ((f_old, t_old), (f_new, t_new))[:: 1 if i % 2 else -1]:
            which[1].append(median_us(which[0], reps) if evict is None else cold_us(which[0], evict))
    a, b = statistics.median(t_old), statistics.median(t_new)
    label = spec if evict is None else f"cold {spec}"
    return f"{label:37s} old {a:9.1f} us  new {b:9.1f} us  new/old {b / a:.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="path of the other build's compiled module (.so)")
    p.add_argument("--new", help="path of a compiled module to time instead of this checkout's build (.so)")
    p.add_argument("--samples", type=int, default=15, help="alternating samples per build (default 15)")
    p.add_argument("--cold", action="store_true", help="time single calls, each after evicting the caches")
    p.add_argument("cases", nargs="*", default=list(DEFAULT_CASES), help="mode:shape:layout:dtype[:threads]")
    args = p.parse_args(argv)
    old_path = Path(args.old)
    for name, given in (("--old", args.old), ("--new", args.new)):
        if given is not None and not Path(given).is_file():
            p.error(f"{name}: expected the path of a compiled bnlab module (.so), got {given!r}, which is not a file")
    if args.samples < 1:
        p.error(f"--samples: expected a positive integer, got {args.samples}")
    try:
        for spec in args.cases:
            parse_case(spec)
    except ValueError as exc:
        p.error(str(exc))
    new = cpu_build.load()
    if new is None or not hasattr(new, "bn_empty"):
        sys.exit(f"this checkout's kernels did not build as a module: {cpu_build.load_error()}")
    native_path = Path(cpu_build.library_path()).resolve()
    new_path = Path(args.new) if args.new is not None else native_path
    if old_path.resolve() == new_path.resolve() or old_path.resolve() == native_path:
        p.error(f"--old: {args.old!r} is this checkout's build or the one timed as new; give another one")
    # (A module already loaded, this checkout's, must not be loaded again by path: the import
    # machinery then hands back the module loaded before it under the same name.)
    if new_path.resolve() != native_path:
        new = cpu_build._load_module(new_path)
    old = cpu_build._load_module(old_path)
    print(f"old {old_path}\nnew {new_path}")
    evict = torch.empty(COLD_BYTES // 4) if args.cold else None
    for spec in args.cases:
        print(compare(old, new, spec, args.samples, evict), flush=True)


if __name__ == "__main__":
    main()
