"""Where a training step's time goes outside bnlab's kernels, and what torch.nn's step pays for the same.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02, second session*): at the
cache-resident conv shapes about 0.45 ms of a bnlab training step (forward + backward through
torch.autograd.grad) is spent outside the two kernel calls, in Python, torch and autograd steps
that run with cold caches right after a kernel; and a step's fixed cost after the caches were
evicted is about the same for bnlab and for torch.nn.

Two tables:
- phases of one bnlab step at --shape: timestamps around the module call, the autograd call and
  the two kernel calls (the compiled module's entry points wrapped), medians of --steps steps;
- a tiny (8, 16, 4, 4) step of bnlab and of torch.nn, right after a 64 MB write (cold) and
  right after another step (warm), medians of --steps.

    PYTHONPATH=src python benchmarks/step_overhead.py [--shape 64,256,14,14] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

import bnlab
from bnlab.backends import cpu as cpu_backend
from bnlab.backends import cpu_build, select_backend
from bench_cases import positive_int, shape_parser

PHASES = ("module call -> forward kernel", "forward kernel", "forward kernel -> module return",
          "autograd.grad -> backward kernel", "backward kernel", "backward kernel -> grads returned")  # fmt: skip


class _Stamped:
    """The compiled module, with a timestamp before and after its two training entry points."""

    def __init__(self, lib, stamps: list):
        self._lib, self._stamps = lib, stamps

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name not in ("bn_forward_train", "bn_backward"):
            return fn

        def stamped(*args):
            self._stamps.append(time.perf_counter())
            out = fn(*args)
            self._stamps.append(time.perf_counter())
            return out

        return stamped


def phases_us(shape, steps: int) -> list[float]:
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    layer = bnlab.BatchNorm2d(shape[1])
    params = list(layer.parameters())
    backend = select_backend(x)
    if not isinstance(backend, cpu_backend.CpuBackend):
        raise SystemExit(f"the default backend for this input is {backend.name!r}, not the compiled CPU kernels")
    stamps: list[float] = []
    lib = backend.kernels()
    backend._loaded = _Stamped(lib, stamps)
    rows = []
    try:
        for i in range(steps + 5):
            stamps.clear()
            stamps.append(time.perf_counter())
            y = layer(x)
            stamps.append(time.perf_counter())
            torch.autograd.grad(y, [x] + params, dy)
            stamps.append(time.perf_counter())
            # order: call, fwd kernel in/out, return, bwd kernel in/out, grads returned
            t = [stamps[0], stamps[1], stamps[2], stamps[3], stamps[4], stamps[5], stamps[6]]
            if i >= 5:
                rows.append([(t[k + 1] - t[k]) * 1e6 for k in range(6)])
    finally:
        backend._loaded = lib
    return [statistics.median(r[k] for r in rows) for k in range(6)]


def tiny_step_us(lib, steps: int, evict: torch.Tensor) -> tuple[float, float]:
    shape = (8, 16, 4, 4)
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    layer = lib.BatchNorm2d(shape[1])
    params = list(layer.parameters())

    def step():
        torch.autograd.grad(layer(x), [x] + params, dy)

    for _ in range(3):
        step()
    cold, warm = [], []
    for _ in range(steps):
        evict.fill_(1.0)
        start = time.perf_counter()
        step()
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        warm.append(time.perf_counter() - start)
    return statistics.median(cold) * 1e6, statistics.median(warm) * 1e6


def main(argv=None) -> None:
    p = shape_parser(__doc__, "64,256,14,14")
    p.add_argument("--steps", type=positive_int, default=60)
    args = p.parse_args(argv)
    if cpu_build.load() is None:
        raise SystemExit(f"bnlab's CPU kernels did not build: {cpu_build.load_error()}")
    torch.set_num_threads(args.threads)
    shape_text = ",".join(map(str, args.shape))
    print(f"# step_overhead.py --shape {shape_text} --threads {args.threads}; microseconds, medians of {args.steps}")
    for name, us in zip(PHASES, phases_us(args.shape, args.steps)):
        print(f"{name:36s} {us:9.1f}")
    evict = torch.empty(16 << 20)  # 64 MB
    for name, lib in (("bnlab", bnlab), ("torch.nn", torch.nn)) * 2:
        cold, warm = tiny_step_us(lib, args.steps, evict)
        print(f"(8, 16, 4, 4) step, {name:9s} after a 64 MB write {cold:7.1f}   after a step {warm:7.1f}")


if __name__ == "__main__":
    main()
