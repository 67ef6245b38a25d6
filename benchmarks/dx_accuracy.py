"""How far the CPU kernels' input gradient lies from the float64 reference, beside torch.nn's.

Claim measured (docs/benchmark_rounds.md, *twenty-sixth session*): with dy's channel mean taken off
before the product (dx = k·(dy - g_hi) + (a·(x - hi) + c), docs/math.md §4.2), dx keeps its
digits where dy has a large common part, and is 0 exactly on channels constant in both x and dy;
elsewhere it is as close as before. For each shape and kind of data, one training forward and
backward of the compiled kernels (CpuBackend.forward_train / backward, weight in [0.5, 2]) on the
rounded values, and the largest |dx - exact| over the tensor divided by the largest |exact|, with
torch.nn's (BatchNorm*d on the same tensors, same weight, float32 parameters for bf16) beside it.
bf16 errors include the output's own rounding (~2e-3). Kinds of data:

    normal     x and dy standard normal
    dy-offset  dy = 8 + 0.01·normal: dy's mean 800 times its spread
    constant   normal, but every other channel constant in both x and dy (exact dx there: 0)
    offset     x = 1000 + 0.01·normal, dy normal
    mean-loss  x normal, dy = 1/numel everywhere (the gradient of y.mean()): the exact dx is 0, so
               the error is max |dx| over the largest |γ·invstd·dy| of a channel instead

Run it with PYTHONPATH at another checkout's src to see that revision's figures.

    PYTHONPATH=src python benchmarks/dx_accuracy.py [--shapes 256,100 32,64,14,14] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import parse_and_announce, shapes_parser  # noqa: E402

from bnlab import reference  # noqa: E402
from bnlab.backends import get_backend  # noqa: E402

DEFAULT_SHAPES = ("256,100", "64,24,2,2", "16,64,7,7", "32,64,14,14", "128,16,8,8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
KINDS = ("normal", "dy-offset", "constant", "offset", "mean-loss")


def data(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the given kind, rounded to dtype."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "dy-offset":
        dy = 8 + 0.01 * dy
    elif kind == "offset":
        x = 1000 + 0.01 * x
    elif kind == "constant":
        x[:, ::2] = 0.75
        dy[:, ::2] = -2.5
    elif kind == "mean-loss":
        dy = torch.full(shape, 1.0 / x.numel(), dtype=torch.float64)
    elif kind != "normal":
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return x.to(dtype), dy.to(dtype)


def errors(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> tuple[float, float]:
    """(bnlab's error, torch.nn's error): max |dx - exact| / max |exact| over the tensor."""
    x, dy = data(shape, dtype, kind)
    weight = torch.linspace(0.5, 2.0, shape[1])
    cpu = get_backend("cpu")
    _, stats, invstd = cpu.forward_train(x, weight, None, 1e-5)
    dx, _, _ = cpu.backward(dy, x, stats.mean, invstd, weight, stats.count, True, batch_mean=True)
    cache = reference.forward_train(x.double().numpy(), weight.double().numpy(), None)[1]
    exact = torch.as_tensor(reference.backward(dy.double().numpy(), cache)[0])
    scale = exact.abs().max().item()
    if kind == "mean-loss":  # exact dx 0 (up to the reference's rounding): the terms' size instead
        dims = [0] + list(range(2, x.dim()))
        invstd = 1.0 / torch.sqrt(x.double().var(dims, unbiased=False) + 1e-5)
        scale = (weight.double() * invstd).max().item() * dy.double().abs().max().item()

    def err(t: torch.Tensor) -> float:
        return (t.double() - exact).abs().max().item() / scale

    layer = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}.get(x.dim(), torch.nn.BatchNorm3d)
    theirs = layer(shape[1]).to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        theirs.weight.copy_(weight)
    xt = x.clone().requires_grad_(True)  # in its own dtype, float32 parameters for 16-bit x (autocast's way)
    theirs(xt).backward(dy)
    return err(dx), err(xt.grad)


def main(argv=None) -> None:
    p = shapes_parser(__doc__, DEFAULT_SHAPES)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    args = parse_and_announce(p, argv, "dx_accuracy.py", "max |dx - exact| / max |exact| against the float64 "
                              "reference on the rounded values; torch.nn on the same tensors")  # fmt: skip
    print(f"{'shape':18s} {'dtype':5s} {'data':10s} {'bnlab':>9s} {'torch.nn':>9s}")
    for shape in args.shapes:
        for name in args.dtypes:
            for kind in KINDS:
                ours, theirs = errors(shape, DTYPES[name], kind)
                print(f"{str(shape):18s} {name:5s} {kind:10s} {ours:9.2e} {theirs:9.2e}", flush=True)


if __name__ == "__main__":
    main()
