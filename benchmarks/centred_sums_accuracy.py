"""How far the training backward's Σdy·x̂ lies from the exact sum, centred against dy whole.

Claim measured (docs/math.md §4.2, docs/benchmarks.md *twenty-eighth session*): the training
backward sums Σ(dy - g)·(x - hi) with g near dy's mean where dy has a large common part, and g = 0
(dy whole) where it has none; that keeps Σdy·x̂ at float32 rounding of the centred terms where dy
has a common part, and costs nothing where it has none. For each kind of x and dy, float32 and
float64, the CPU kernels' grad_sums with batch_mean=True ("centred") and False ("whole"), on
tensors of every shape given: the largest |Σdy·x̂ - exact| over the channels, relative to the size
of the centred terms sqrt(Σ((dy - mean(dy))·x̂)²), worst over the shapes. exact: long double over
the exact batch mean of the rounded values (a float64 mean of 1e3 ± 0.01 is itself 5.7e-12 of
its spread off). Kinds:

    x normal, or 1e3 ± 0.01 ("offset")
    dy zero-mean (normal), dy-offset (8 + 0.01·normal), per-sample (each sample its own normal
       offset, zero mean over the batch, plus 0.01·normal: as per-sample loss weights make)

Run it with PYTHONPATH at another checkout's src to see that revision's figures (before
2026-12-05 there is no batch_mean: use --whole-only).

    PYTHONPATH=src python benchmarks/centred_sums_accuracy.py [--shapes 220,9,588 64,256,14,14]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import parse_and_announce, shapes_parser  # noqa: E402

from bnlab.backends import get_backend  # noqa: E402

DEFAULT_SHAPES = ("16,8,9,9", "96,3,16,16", "64,24,2,2", "257,6", "4100,10", "220,9,588", "64,256,14,14",
                  "8,64,56,56")  # fmt: skip
X_KINDS = ("normal", "offset")
DY_KINDS = ("zero-mean", "dy-offset", "per-sample")


def data(shape, dtype: torch.dtype, x_kind: str, dy_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the given kinds, rounded to dtype, contiguous."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if x_kind == "offset":
        x = 1e3 + 0.01 * x
    if dy_kind == "dy-offset":
        dy = 8 + 0.01 * noise
    elif dy_kind == "per-sample":
        dy = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64) + 0.01 * noise
    else:
        dy = noise
    return x.to(dtype), dy.to(dtype)


def errors(shape, dtype: torch.dtype, x_kind: str, dy_kind: str, forms=(True, False)) -> list[float]:
    """The relative error of Σdy·x̂ for each batch_mean in forms (see the module's docstring)."""
    x, dy = data(shape, dtype, x_kind, dy_kind)
    cpu = get_backend("cpu")
    _, stats, invstd = cpu.forward_train(x, None, None, 1e-5)
    dims = tuple([0] + list(range(2, x.dim())))
    xd, dyd = (t.double().numpy().astype(np.longdouble) for t in (x, dy))
    x_hat = (xd - xd.mean(dims, keepdims=True)) * invstd.double().numpy().reshape((1, -1) + (1,) * (x.dim() - 2))
    exact = (dyd * x_hat).sum(dims)
    scale = np.sqrt((((dyd - dyd.mean(dims, keepdims=True)) * x_hat) ** 2).sum(dims))
    out = []
    for batch_mean in forms:
        extra = () if batch_mean is None else (batch_mean,)
        got = cpu.grad_sums(dy, x, stats.mean, invstd, *extra)[1].numpy().astype(np.longdouble)
        out.append(float((abs(got - exact) / scale).max()))
    return out


def main(argv=None) -> None:
    p = shapes_parser(__doc__, DEFAULT_SHAPES)
    p.add_argument("--whole-only", action="store_true", help="a revision before batch_mean: its one form")
    args = parse_and_announce(p, argv, "centred_sums_accuracy.py", "max |Σdy·x̂ - exact| / size of the centred "
                              "terms, worst over the shapes")  # fmt: skip
    forms = (None,) if args.whole_only else (True, False)
    print(f"{'x':7s} {'dy':10s} {'dtype':8s} " + " ".join(f"{n:>9s}" for n in (("whole",) if args.whole_only
                                                                              else ("centred", "whole"))))  # fmt: skip
    for x_kind in X_KINDS:
        for dy_kind in DY_KINDS:
            for dtype in (torch.float32, torch.float64):
                worst = [0.0] * len(forms)
                for shape in args.shapes:
                    worst = [max(a, b) for a, b in zip(worst, errors(shape, dtype, x_kind, dy_kind, forms))]
                name = str(dtype).removeprefix("torch.")
                print(f"{x_kind:7s} {dy_kind:10s} {name:8s} " + " ".join(f"{w:9.2e}" for w in worst), flush=True)


if __name__ == "__main__":
    main()
