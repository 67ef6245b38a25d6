"""What a BN eval call costs around its kernel, right after a large memory operation.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02*): at cache-resident shapes the eval
kernel alone runs at the speed of `copy_`, and the module call's extra time is Python and torch
work that runs with cold caches, because the kernel before it streamed megabytes through them.
Three tables, medians of --rounds samples of --reps calls:

- the eval kernel writing into one fixed buffer, the same kernel writing into a fresh output
  (bnlab's pool), the module call, and `copy_` into a fixed buffer;
- the time of a trivial `torch.empty(10)` right after an 8 MB kernel, a 8 MB `copy_`, a 1 KB
  `copy_`, and nothing.

    PYTHONPATH=src python benchmarks/cold_call.py [--shape 128,16,32,32] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

import bnlab
from bnlab.backends import _REGISTRY, cpu, cpu_build, cpu_pool
from bench_cases import positive_int, shape_parser
from bench_timing import median_us


def after_us(before, step, rounds: int, reps: int) -> float:
    """Median time of step() alone, each time right after before()."""
    samples = []
    for _ in range(rounds):
        total = 0.0
        for _ in range(reps):
            before()
            start = time.perf_counter()
            step()
            total += time.perf_counter() - start
        samples.append(total / reps * 1e6)
    return statistics.median(samples)


def main() -> None:
    p = shape_parser(__doc__, "128,16,32,32")
    p.add_argument("--rounds", type=positive_int, default=21)
    p.add_argument("--reps", type=positive_int, default=200)
    args = p.parse_args()
    shape = args.shape
    torch.set_num_threads(args.threads)
    backend = next(b for b in _REGISTRY if b.name == "cpu")
    if backend._lib is None:
        raise SystemExit(f"the compiled CPU kernels are unavailable: {cpu_build.load_error()}")
    x = torch.randn(shape)
    layer = bnlab.BatchNorm2d(shape[1]).eval()
    rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
    layout, n, c, length = cpu.layout_of(x)
    f32 = cpu._CODE[torch.float32]

    def kernel(y):
        backend._lib.bn_eval(x.data_ptr(), y.data_ptr(), f32, layout, n, c, length, rm.data_ptr(), f32,
                             rv.data_ptr(), f32, w.data_ptr(), f32, b.data_ptr(), f32, 1e-5, args.threads)  # fmt: skip

    fixed = torch.empty_like(x)
    small, small_out = torch.randn(16, 16), torch.empty(16, 16)
    r, k = args.rounds, args.reps
    shape_text = ",".join(map(str, shape))
    print(f"# cold_call.py --shape {shape_text} --threads {args.threads}; "
          f"torch {torch.__version__}, medians of {r} samples x {k} calls, microseconds")
    with torch.no_grad():
        rows = {
            "eval kernel, fixed output": median_us(lambda: kernel(fixed), r, k),
            "eval kernel, fresh pooled output": median_us(lambda: kernel(cpu_pool.empty_like(x)), r, k),
            "module eval call": median_us(lambda: layer(x), r, k),
            "copy_ into a fixed buffer": median_us(lambda: fixed.copy_(x), r, k),
        }
        for name, us in rows.items():
            print(f"{name:34s} {us:8.1f}")
        print("torch.empty(10) right after:")
        for name, before in (("the eval kernel", lambda: kernel(fixed)), ("copy_ of x", lambda: fixed.copy_(x)),
                             ("a 1 KB copy_", lambda: small_out.copy_(small)), ("nothing", lambda: None)):  # fmt: skip
            print(f"  {name:32s} {after_us(before, lambda: torch.empty(10), r, k):8.2f}")


if __name__ == "__main__":
    main()
