"""How far the CPU kernels' bf16 and float16 batch statistics lie from float64 sums of the same values.

Claim measured (docs/benchmark_rounds.md, *twenty-fifth session*): the NCL walks' 16-bit statistics were
1e-5-3.3e-5 off in the variance and up to 1.2e-5 in the mean at rows shorter than a vector; with
each row's tail added in float64 and the median-of-three shift they are within ~4e-7 (7x7 maps:
the float32 lanes, ~2e-6). For each shape and dtype: normal data (mean 1.13, deviation 0.79,
rounded to the dtype), one training forward of the compiled kernels (CpuBackend.forward_train),
and the largest relative error of the batch mean and the biased batch variance against float64
mean and variance of the rounded values, with torch.nn's on float32 copies beside them
(running_var with momentum 1, made biased again). Run it with PYTHONPATH at another checkout's src
to see that revision's figures.

    PYTHONPATH=src python benchmarks/stats_accuracy_16bit.py [--shapes 124,40,6 64,24,7,7] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import parse_and_announce, shapes_parser  # noqa: E402

from bnlab.backends import get_backend  # noqa: E402

DEFAULT_SHAPES = ("54,1100,7,2", "32,1,6", "124,40,6", "2048,8,3", "500,4,14", "300,16,5,3", "64,8,32,32",
                  "16,3,100,100", "4096,300", "64,24,7,7")  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def errors(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[float, float, float]:
    """(mean error, variance error, torch.nn's variance error), relative to max(1, |exact|)."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 0.79 + 1.13).to(dtype)
    _, stats, _ = get_backend("cpu").forward_train(x, None, None, 1e-5)
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)

    def rel(a, e):
        return ((a.double() - e).abs() / e.abs().clamp(min=1)).max().item()

    theirs = (torch.nn.BatchNorm1d if x.dim() <= 3 else torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm3d)(
        shape[1], momentum=1.0
    )
    with torch.no_grad():
        theirs(x.float())
    m = x.numel() // shape[1]
    return rel(stats.mean, mean), rel(stats.m2 / stats.count, var), rel(theirs.running_var * (m - 1) / m, var)


def main(argv=None) -> None:
    p = shapes_parser(__doc__, DEFAULT_SHAPES)
    args = parse_and_announce(p, argv, "stats_accuracy_16bit.py", "relative errors of the batch mean and variance against "
                       "float64 sums of the rounded values; torch.nn on float32 copies")  # fmt: skip
    print(f"{'shape':22s} {'dtype':5s} {'mean':>9s} {'variance':>9s} {'torch.nn variance':>18s}")
    for shape in args.shapes:
        for name, dtype in DTYPES.items():
            e_mean, e_var, e_torch = errors(shape, dtype)
            print(f"{str(shape):22s} {name:5s} {e_mean:9.2e} {e_var:9.2e} {e_torch:18.2e}", flush=True)


if __name__ == "__main__":
    main()
