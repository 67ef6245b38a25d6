"""Where a GPU call's time goes: each kernel's device time inside a real bnlab (and torch.nn) call.

Claim measured (docs/benchmarks.md, *GPU (Triton)*): whether a module call takes the time its
kernels take alone (benchmarks/triton_tune.py times them alone), and what the rest is: for each
case, the median wall time per call (CUDA events over back-to-back calls; and by the host clock
around them and a synchronisation, as bench_bn.py times), the sum of its kernels' device times
(torch.profiler), and each kernel's count and mean time per call. Wall time well
over the kernels' sum means the device waits on the host (launch gaps); a kernel slower here than
alone means its inputs or grid differ from the tuning run's.

    python benchmarks/gpu_kernel_times.py --shapes gpu-112 --dtypes fp32,bf16 --layouts nchw,cl \
        --modes fwdbwd [--calls 20]

Needs a GPU; the cases are bench_cases.contenders' (the benchmark's own callables).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import SHAPES  # noqa: E402
from bench_cases import DTYPES, MODES, contenders, refuse_unknown_names, sample_grad_mode  # noqa: E402
from bench_timing import events_us  # noqa: E402


def host_clock_ms(fn, calls: int, repeats: int = 5) -> float:
    """As bench_bn times a sample: the host clock around ``calls`` back-to-back calls and one
    synchronisation, per call; median over ``repeats``, in milliseconds."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000 / calls)
    return statistics.median(times)


def kernel_times(fn, calls: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches per call, mean device microseconds per launch)} over ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = event.cuda_time_total
        if total > 0 and event.count > 0:
            out[event.key] = (event.count / calls, total / event.count)
    return out


def report(case: str, name: str, fn, calls: int) -> str:
    for _ in range(3):  # compile, allocator and handles out of the figures
        fn()
    torch.cuda.synchronize()
    wall = events_us(fn, calls) / 1000
    host = host_clock_ms(fn, calls)
    kernels = kernel_times(fn, calls)
    busy = sum(count * us for count, us in kernels.values()) / 1000
    lines = [f"{case} {name}: wall {wall:.3f} ms/call (host clock {host:.3f}), kernels {busy:.3f} ms/call "
             f"(host or idle {max(wall - busy, 0.0):.3f})"]  # fmt: skip
    for key, (count, us) in sorted(kernels.items(), key=lambda item: -item[1][0] * item[1][1]):
        lines.append(f"    {count:4.1f}x {us:9.1f} us  {key[:100]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpu-112", help=f"comma-separated names of {sorted(SHAPES)}")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--modes", default="fwdbwd", help=f"comma-separated, of {MODES}")
    p.add_argument("--calls", type=int, default=20, help="calls per timing and per profile")
    p.add_argument("--contenders", default="bnlab,torch", help="of bnlab, torch, copy, copy_")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls: expected a positive number of calls, got {args.calls}")
    refuse_unknown_names(p, args, {"shapes": SHAPES, "dtypes": DTYPES, "layouts": ("nchw", "cl"), "modes": MODES,
                                   "contenders": ("bnlab", "torch", "copy", "copy_")})  # fmt: skip
    if not torch.cuda.is_available():
        p.error("a CUDA device is needed (this script times GPU kernels)")
    print(f"# gpu_kernel_times.py; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for shape_name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                for mode in args.modes.split(","):
                    case = f"{shape_name}/{layout}/{dtype_name}/{mode}"
                    fns = contenders(SHAPES[shape_name], layout, DTYPES[dtype_name], mode, "cuda", False)
                    for name in args.contenders.split(","):
                        with sample_grad_mode(mode):  # eval under no_grad, as bench_bn.py times it
                            print(report(case, name, fns[name], args.calls), flush=True)
                    del fns
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
