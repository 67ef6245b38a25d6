"""The host's share of a GPU BatchNorm call: bnlab's Python around its Triton launches, without a GPU.

Claim measured (docs/benchmarks.md, "GPU kernels"): how many microseconds of Python, torch and
autograd a training forward, a forward+backward step and an eval cost around the kernels, and
how many kernels each launches. On a GPU every tensor of a few MB is done in microseconds, so
this time, not the memory, decides whether bnlab keeps up with torch.nn there.

How: Triton's JITFunction.run is replaced by a counter, so nothing is compiled or launched; the
Triton backend then runs on CPU tensors (TritonBackend(allow_cpu=True)) through the same code as
on CUDA, except that torch allocates on the CPU (cheaper than CUDA's caching allocator) and the
launch itself (Triton's argument binding and the driver call) costs nothing. Medians of 7
samples of 2000 calls; the launches are counted in a separate call.

    python benchmarks/triton_host_time.py [--shapes 256,100 128,16,32,32]
"""

from __future__ import annotations

import argparse

import torch

from triton.runtime.jit import JITFunction

import bnlab
from bnlab.backends import _REGISTRY, PortableBackend
from bnlab.backends.triton_backend import TritonBackend
from bench_timing import median_us

_LAUNCHES = [0]


def _count_launch(self, *args, **kwargs):
    _LAUNCHES[0] += 1


def launches(fn) -> int:
    _LAUNCHES[0] = 0
    fn()
    return _LAUNCHES[0]


def measure(shape: tuple[int, ...], calls: int = 2000) -> dict[str, tuple[float, int]]:
    """{call: (microseconds, Triton launches)} for one input shape, float32, contiguous."""
    x, dy = torch.randn(shape), torch.randn(shape)
    module = {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d, 5: bnlab.BatchNorm3d}[len(shape)]
    layer = module(shape[1])
    xg = x.clone().requires_grad_()
    params = list(layer.parameters())

    def step():
        return torch.autograd.grad(layer(xg), [xg, *params], dy)

    def evaluate():
        with torch.no_grad():
            return layer(x)

    out = {}
    layer.train()
    out["training forward"] = (median_us(lambda: layer(x), 7, calls), launches(lambda: layer(x)))
    out["forward + backward step"] = (median_us(step, 7, calls), launches(step))
    layer.eval()
    out["eval"] = (median_us(evaluate, 7, calls), launches(evaluate))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["256,100", "128,16,32,32"], help="comma-separated sizes")
    p.add_argument("--calls", type=int, default=2000, help="calls per sample (7 samples)")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls: expected a positive number of calls, got {args.calls}")
    shapes = []
    for text in args.shapes:
        try:
            shapes.append(tuple(int(v) for v in text.split(",")))
        except ValueError:
            p.error(f"--shapes: expected comma-separated integers such as 128,16,32,32, got {text!r}")
        if not 2 <= len(shapes[-1]) <= 5 or min(shapes[-1]) < 1:
            p.error(f"--shapes: expected 2 to 5 positive sizes, got {text!r}")
    JITFunction.run = _count_launch
    _REGISTRY[:] = [TritonBackend(allow_cpu=True, self_check=False), PortableBackend()]
    torch.set_num_threads(1)
    print(f"# triton_host_time.py {' '.join(args.shapes)}; torch {torch.__version__}, launches stubbed; "
          "microseconds per call (median), Triton launches per call")  # fmt: skip
    for shape in shapes:
        for name, (us, n) in measure(shape, args.calls).items():
            print(f"{str(shape):18s} {name:26s} {us:7.1f} us  {n} launches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
