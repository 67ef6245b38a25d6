"""How long BN calls take right after the process did something else for a while.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02, second session*): on the Xeon VM the
benchmark's contenders find their tensors partly evicted whenever another contender ran before
them, even when that one touched no memory at all, and it takes several calls to get back to the
steady speed. Each row: a pause of --pause seconds spent one of three ways (sleeping, a Python busy
loop on one thread, a two-thread in-place multiply over a 64 MB tensor), then --calls training
steps (forward + backward) of bnlab's BatchNorm2d, each timed; medians over --rounds pauses. The
`kernels` rows time the two kernel calls alone (no Python module, no autograd, no allocation), so
Python's own cold start is not what they show.

    PYTHONPATH=src python benchmarks/idle_ramp.py [--shape 128,16,32,32] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

import bnlab
from bnlab.backends import cpu_build
from bnlab.backends.cpu import WAVE_PER_THREAD, layout_of
from bench_cases import positive_int, shape_parser


def module_step(shape):
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    layer = bnlab.BatchNorm2d(shape[1])
    params = list(layer.parameters())

    def step():
        return torch.autograd.grad(layer(x), [x] + params, dy)

    return step


def kernel_step(shape, threads: int):
    lib = cpu_build.load()
    x, dy = torch.randn(shape), torch.randn(shape)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    layout, n, c, length = layout_of(x)
    stats = torch.empty(3, c, dtype=torch.float64)
    ptr, wave = stats.data_ptr(), WAVE_PER_THREAD * threads

    def step():
        lib.bn_forward_train(x.data_ptr(), y.data_ptr(), 0, layout, n, c, length, 0, 0, 0, 0, 1e-5, ptr, 0, 0, 0, 0,
                             0.1, 0, False, False, threads, wave)  # fmt: skip
        lib.bn_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), 0, layout, n, c, length, ptr, ptr + 16 * c, 0, 0,
                        float(n * length), 0, 0, 0, 0, 0, threads, wave, 1)  # fmt: skip

    step.keep = (x, dy, y, dx, stats)  # alive as long as the step
    return step


def pauses(seconds: float):
    big = torch.randn(4096, 4096)

    def busy_python():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def busy_memory():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            big.mul_(1.0)

    return {"none": lambda: None, "sleep": lambda: time.sleep(seconds), "python loop": busy_python,
            "64 MB multiply": busy_memory}  # fmt: skip


def main(argv=None) -> None:
    p = shape_parser(__doc__, "128,16,32,32")
    p.add_argument("--pause", type=float, default=0.02, help="seconds of other work before each series")
    p.add_argument("--calls", type=positive_int, default=10, help="timed steps after each pause")
    p.add_argument("--rounds", type=positive_int, default=15)
    args = p.parse_args(argv)
    if cpu_build.load() is None:
        raise SystemExit(f"bnlab's CPU kernels did not build: {cpu_build.load_error()}")
    torch.set_num_threads(args.threads)
    steps = {"module": module_step(args.shape), "kernels": kernel_step(args.shape, args.threads)}
    print(f"# idle_ramp.py --shape {','.join(map(str, args.shape))} --threads {args.threads} --pause {args.pause}; "
          f"ms per step, call 1..{args.calls} after the pause, medians of {args.rounds}")  # fmt: skip
    for kind, step in steps.items():
        for _ in range(3):
            step()
        for name, pause in pauses(args.pause).items():
            rows = []
            for _ in range(args.rounds):
                pause()
                row = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    step()
                    row.append((time.perf_counter() - start) * 1e3)
                rows.append(row)
            medians = [statistics.median(r[i] for r in rows) for i in range(args.calls)]
            print(f"{kind:8s} {name:15s} " + " ".join(f"{v:5.2f}" for v in medians), flush=True)


if __name__ == "__main__":
    main()
