"""Where an eval call's time goes beyond the kernel, with the caches as the benchmark leaves them.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02, fourth session*): at the
cache-resident conv shapes the eval kernel alone runs at the speed of ``copy_``, and what keeps
bnlab's eval below 90 % of a copy is the Python on the way to it, which runs with cold caches
after the other contenders' calls: ``nn.Module.__call__``, the module's checks, the backend's
bookkeeping and the pooled output. (torch.nn is not among the contenders: its eval allocates its
output with malloc, whose cost here depends on what glibc's heap went through before; bench_bn.py
compares the two.)

Each round calls, in turn, entry points of increasing depth (the module, its ``forward``,
``bnlab._fastpath.module_forward``, ``CpuBackend.eval_forward``, the compiled ``bn_eval`` into a
pooled output and into an output allocated once) and ``copy_`` into a buffer allocated once, so
that each finds the caches as the one before left them, as in bench_bn.py's rotation. Prints the
median of each, in microseconds.

    PYTHONPATH=src python benchmarks/eval_overhead.py [--shape 128,16,32,32] [--threads 2] [--rounds 40]
"""

from __future__ import annotations

import statistics
import time

import torch

import bnlab
from bnlab._fastpath import module_forward
from bnlab.backends import cpu_build, cpu_pool
from bnlab.backends.cpu import _CODE, CpuBackend, layout_of, threads_for
from bench_cases import shape_parser


def contenders(shape) -> dict:
    """{name: zero-argument callable}: the eval of one (shape) float32 NCHW input at each depth."""
    x = torch.randn(shape)
    channels = shape[1]
    layer = bnlab.BatchNorm2d(channels).eval()
    backend = CpuBackend()
    lib = backend.kernels()
    rm, rv = layer.running_mean, layer.running_var
    w, b = layer.weight.detach(), layer.bias.detach()
    lay, n, c, length = layout_of(x)
    f32 = _CODE[torch.float32]
    fixed, dst = torch.empty_like(x), torch.empty_like(x)

    def kernel(y):
        lib.bn_eval(x.data_ptr(), y.data_ptr(), f32, lay, n, c, length, rm.data_ptr(), f32, rv.data_ptr(), f32,
                    w.data_ptr(), f32, b.data_ptr(), f32, layer.eps, threads_for(x))  # fmt: skip
        return y

    return {
        "module call, layer(x)": lambda: layer(x),
        "layer.forward(x)": lambda: layer.forward(x),
        "_fastpath.module_forward": lambda: module_forward(layer, x),
        "CpuBackend.eval_forward": lambda: backend.eval_forward(x, rm, rv, w, b, layer.eps),
        "bn_eval kernel, pooled output": lambda: kernel(cpu_pool.empty_like(x)),
        "bn_eval kernel, output allocated once": lambda: kernel(fixed),
        "copy_ (buffer allocated once)": lambda: dst.copy_(x),
    }


def main(argv=None) -> None:
    p = shape_parser(__doc__, "128,16,32,32")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    if args.rounds < 6:
        p.error(f"--rounds: expected at least 6 (the first 5 warm up), got {args.rounds}")
    if cpu_build.load() is None:
        raise SystemExit(f"bnlab's CPU kernels did not build: {cpu_build.load_error()}")
    torch.set_num_threads(args.threads)
    calls = contenders(args.shape)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    shape_text = ",".join(map(str, args.shape))
    print(f"# eval_overhead.py --shape {shape_text} --threads {args.threads}; microseconds, medians of {args.rounds - 5}")
    for name, values in times.items():
        print(f"{name:40s} {statistics.median(values[5:]) * 1e6:9.1f}")


if __name__ == "__main__":
    main()
