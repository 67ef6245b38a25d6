"""Whether two builds of bnlab's CPU kernels compute the same bits.

Claim checked: a kernel change that only reorders the work (a new walk, new blocks, registers
instead of memory) leaves every output, statistic and gradient as it was, e.g. "816 outputs,
statistics and gradients equal to the previous build's" in docs/benchmark_rounds.md. Both builds are
loaded into this process and called on the same tensors: eval (y from running averages), the
training forward (y, mean, M2, invstd, the running averages it updates) and the backward (dx, Σdy,
Σdy·x̂, and the weight and bias gradients in float32), with weight and bias, over shapes that reach every
NCL and NLC walk, float32/bfloat16/float16/float64, one to three threads (three: the waves walk merges three parts), and three kinds of data
(normal; 1e3 ± 0.01, where the shifted sums matter; normal with NaN, inf and 3e38 values).
Results compare as bytes, except that any NaN equals any NaN (x86 returns the first operand's
NaN, whose sign a compiler may swap). Prints each difference and the totals; exits 1 on any.

    PYTHONPATH=src python benchmarks/compare_builds.py --old <the other revision's compiled module>

(--new <a compiled module> compares that build instead of this checkout's, e.g. two builds of
one source with different compiler flags. --within K takes results that differ in their bits as
close enough when their NaNs and infinities are where the other build's are and no finite value is
further off than K times the dtype's epsilon times the largest finite magnitude of the result: for
a build whose arithmetic differs by design, e.g. one without FMA instructions, where a multiply
and an add round twice. It exits 1 only on results beyond that.)

(kernel_ab.py's docstring says how to build another revision's module.) BNLAB_* tuning variables
set in the environment apply to both builds alike, which reaches the walks a shape would not take
on its own, e.g. BNLAB_NCL_GROUP_BYTES=0 BNLAB_NCL_FLAT_MAX_BYTES=0 for the per-channel walk.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from bnlab.backends import cpu_build
from bnlab.backends.cpu import WAVE_PER_THREAD, _CODE, layout_of
from bnlab.lab.tables import counted
from kernel_ab import takes_centred

SHAPES = (
    (128, 16, 32, 32), (64, 256, 14, 14), (256, 32, 16, 16), (64, 32, 32, 32), (32, 512, 7, 7),
    (8, 64, 56, 56), (4, 8, 64, 64), (37, 17, 9, 9), (23, 3, 10, 10), (5, 70, 30), (3, 16, 32, 32),
    (1, 24, 1024), (256, 100), (300, 72), (301, 7), (40, 13), (64, 24, 5), (33, 100, 3), (2, 2048, 7, 7),
    (2, 8192), (3, 1000, 2, 2), (45, 17), (37, 200), (12, 64, 56, 56), (2, 5, 2304), (8, 3, 1600),
    (64, 8, 14, 14), (21, 96), (9, 112), (6, 24, 8, 8), (7, 5, 4, 8), (5, 300), (16, 520), (160, 64, 3, 3),
    (10, 80), (6, 128),
)  # fmt: skip
# (10, 80) and (6, 128), with (21, 96), (9, 112), (3, 48, 7, 7) and (4, 64, 5, 5): float32 rows of 48
# to 128 channels, whose coefficients the AVX-512 register forms hold (nlc_affine_registers: 48-128,
# nlc_grad_input_registers: 48-80; fifty-first session)
# (160, 64, 3, 3), like (64, 24, 5), (33, 100, 3) and (3, 1000, 2, 2): rows shorter than a vector, summed
# across channels (cpu_kernels_ncl_tails.inc); at 128 KiB or more, the groups' sums then one pass
# (forty-fifth session)
# (5, 300) and (16, 520), like (2, 8192) and (9, 112): at most 16 rows, which one thread takes by the
# narrow NLC walks (forty-second session), two and three threads by the general ones
# (6, 24, 8, 8) and (7, 5, 4, 8): bf16 rows of 2 and 1 whole 64-byte lines, run across the rows' ends
# on AVX512-BF16 builds (pair_rows, forty-first session).
# (3, 48, 7, 7) and (4, 64, 5, 5), like (21, 96) and (9, 112) above: rows of 33-127 channels that
# no narrow or periodic form takes, two rows at a time in both builds (nlc_grad_input_f32_pairs),
# an odd row count among them
CHANNELS_LAST = (
    (64, 32, 14, 14), (16, 24, 9, 9), (8, 3, 10, 10), (12, 16, 9, 9), (6, 8, 7, 7), (5, 12, 6, 6), (3, 48, 7, 7),
    (4, 64, 5, 5),
)  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DATA = ("normal", "offset", "nonfinite")


def make(shape, dtype, data: str, seed: int, channels_last: bool) -> torch.Tensor:
    """A (shape) tensor of dtype with the given kind of data, contiguous or channels_last."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if data == "offset":
        t = 1e3 + 0.01 * t
    elif data == "nonfinite":
        flat = t.view(-1)
        for k, v in enumerate((float("nan"), float("inf"), -float("inf"), 3e38)):
            flat[(k * 7919 + 13) % flat.numel()] = v
    t = t.to(dtype)
    if data == "nonfinite":
        # NaNs other than the default one, written as bits (a conversion may make them canonical):
        # a negative quiet NaN (x86's default result of inf - inf) and a signalling NaN with a
        # payload, which must come out as NaN wherever the default one does.
        ints, negative, signalling = NAN_BITS[dtype]
        flat = t.view(-1).view(ints)
        flat[(5 * 7919 + 13) % flat.numel()] = negative
        flat[(6 * 7919 + 13) % flat.numel()] = signalling
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


#: dtype -> (its integer view, a negative quiet NaN, a signalling NaN with a payload), as signed integers
NAN_BITS = {
    torch.bfloat16: (torch.int16, -64, 0x7F81),  # 0xFFC0, 0x7F81
    torch.float16: (torch.int16, -512, 0x7C01),  # 0xFE00, 0x7C01
    torch.float32: (torch.int32, -(1 << 22), 0x7FA00001),  # 0xFFC00000, 0x7FA00001
    torch.float64: (torch.int64, -(1 << 51), 0x7FF4000000000001),  # 0xFFF8000000000000, 0x7FF4000000000001
}


def run(lib, x: torch.Tensor, dy: torch.Tensor, nt: int, centred: tuple = (1,)) -> dict[str, torch.Tensor]:
    """Forward and backward of one build on x, dy: the named results. centred: bn_backward's last
    argument, (1,) for the training backward, (0,) for fixed statistics, () for a build before it."""
    lay, n, c, length = layout_of(x)
    code = _CODE[x.dtype]
    gen = torch.Generator().manual_seed(7)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5  # running averages, updated
    y, dx, y_eval = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    stats, sums = torch.empty(3, c, dtype=torch.float64), torch.empty(2, c, dtype=torch.float64)
    dw, db = torch.empty(c), torch.empty(c)
    fc = _CODE[torch.float32]
    lib.bn_eval(x.data_ptr(), y_eval.data_ptr(), code, lay, n, c, length, rm.data_ptr(), fc, rv.data_ptr(), fc,
                w.data_ptr(), fc, b.data_ptr(), fc, 1e-5, nt)  # fmt: skip
    lib.bn_forward_train(x.data_ptr(), y.data_ptr(), code, lay, n, c, length, w.data_ptr(), fc, b.data_ptr(), fc,
                         1e-5, stats.data_ptr(), rm.data_ptr(), fc, rv.data_ptr(), fc, 0.1, 0, 0, 0, nt,
                         WAVE_PER_THREAD * nt)  # fmt: skip
    ptr = stats.data_ptr()
    lib.bn_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), code, lay, n, c, length, ptr, ptr + 16 * c,
                    w.data_ptr(), fc, float(n * length), sums.data_ptr(), dw.data_ptr(), fc, db.data_ptr(), fc, nt,
                    WAVE_PER_THREAD * nt, *centred)  # fmt: skip
    return {"y": y, "mean": stats[0], "M2": stats[1], "invstd": stats[2], "dx": dx, "sum_dy": sums[0],
            "sum_dy_xhat": sums[1], "y_eval": y_eval, "running_mean": rm, "running_var": rv, "dweight": dw,
            "dbias": db}  # fmt: skip


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bytes, any NaN equal to any NaN."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    return a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


def within(a: torch.Tensor, b: torch.Tensor, k: float) -> bool:
    """Whether a is b up to k epsilons of b's dtype, scaled by b's largest finite magnitude, with
    NaN, +inf and -inf at the same places (a result of another rounding, not of another walk)."""
    for where in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(where(a), where(b)):
            return False
    finite = torch.isfinite(b)
    a64, b64 = a.double().where(finite, 0.0), b.double().where(finite, 0.0)
    return (a64 - b64).abs().max().item() <= k * torch.finfo(b.dtype).eps * b64.abs().max().item()


def bits_digest(t: torch.Tensor) -> str:
    """A sha256 of t's bytes under same_bits' rule (any NaN equal to any NaN): for comparing
    results computed in other processes."""
    t = t.contiguous()
    nan = torch.isnan(t)
    raw = t.masked_fill(nan, 0).view(torch.uint8).numpy().tobytes() + nan.numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def dtype_data():
    """(dtype, kind of data) of every comparison: all pairs but 1e3 ± 0.01 in 16 bits."""
    for dtype in DTYPES:
        for data in DATA:
            if data == "offset" and dtype in (torch.bfloat16, torch.float16):
                continue  # 16-bit floats hold 1e3 ± 0.01 as a constant
            yield dtype, data


def inputs(shapes):
    """(shape, dtype, data, x, dy) for each of shapes (4-d: channels_last) and dtype_data()."""
    for shape in shapes:
        for dtype, data in dtype_data():
            cl = len(shape) == 4
            yield shape, dtype, data, make(tuple(shape), dtype, data, 1, cl), make(tuple(shape), dtype, "normal", 2, cl)


def cases(threads=(1, 2, 3)):
    """(shape, dtype, data, channels_last, threads) of every comparison, on each thread count of
    ``threads``."""
    for nt in threads:
        for dtype, data in dtype_data():
            for cl, shapes in ((False, SHAPES), (True, CHANNELS_LAST)):
                for shape in shapes:
                    yield shape, dtype, data, cl, nt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="path of the other build's compiled module (.so)")
    p.add_argument("--new", help="path of a compiled module to compare instead of this checkout's build")
    p.add_argument("--threads", default="1,2,3", metavar="N,N",
                   help="the thread counts to compare on (default 1,2,3: three for the waves walk's merge)")
    p.add_argument("--within", type=float, metavar="K",
                   help="accept results that differ in bits by at most K epsilons of the result's scale")
    args = p.parse_args(argv)
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        threads = ()
    if not threads or min(threads) < 1:
        p.error(f"--threads: expected positive thread counts separated by commas, got {args.threads!r}")
    if args.within is not None and not args.within > 0:
        p.error(f"--within: expected a positive number of epsilons, got {args.within}")
    for option, value in (("--old", args.old), ("--new", args.new)):
        if value is not None and not Path(value).is_file():
            p.error(f"{option}: expected the path of a compiled bnlab module (.so), got {value!r}, which is not a file")
    if args.new is None:
        new, new_path = cpu_build.load(), cpu_build.library_path()
        if new is None or not hasattr(new, "bn_empty"):
            sys.exit(f"this checkout's kernels did not build as a module: {cpu_build.load_error()}")
    else:
        new, new_path = None, args.new
    # The same file twice would be one module compared with itself (loaded again by path, a module
    # comes back as the one loaded before): 0 differ, whatever the builds.
    if Path(args.old).resolve() == Path(new_path).resolve():
        p.error(f"--old: {args.old!r} is the build compared as new; give another one")
    if new is None:
        new = cpu_build._load_module(Path(args.new))
    old = cpu_build._load_module(Path(args.old))
    print(f"old {args.old}\nnew {new_path}")
    # A build before bn_backward's `centred` argument sums as a new one does with centred = 0.
    flags = {lib: (1,) if takes_centred(lib) else () for lib in (old, new)}
    if not all(flags.values()):
        print("one build predates the centred backward: both compared with fixed-statistics sums (centred = 0)")
        flags = {lib: (0,) if takes_centred(lib) else () for lib in (old, new)}
    compared = differ = beyond = 0
    for shape, dtype, data, cl, nt in cases(threads):
        x = make(shape, dtype, data, 1, cl)
        dy = make(shape, dtype, "normal", 2, cl)
        a, b = run(old, x, dy, nt, flags[old]), run(new, x, dy, nt, flags[new])
        for name in a:
            compared += 1
            if not same_bits(a[name], b[name]):
                differ += 1
                if args.within is not None and within(a[name], b[name], args.within):
                    continue
                beyond += 1
                print(f"differs: {name} of {shape} {'channels_last ' if cl else ''}{dtype} {data}, "
                      f"{counted(nt, 'thread')}")
    if args.within is None:
        print(f"{compared} results compared, {differ} differ")
        sys.exit(1 if differ else 0)
    print(f"{compared} results compared, {differ} differ in bits, {beyond} by more than {args.within:g} epsilons")
    sys.exit(1 if beyond else 0)


if __name__ == "__main__":
    main()
