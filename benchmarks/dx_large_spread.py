"""The input gradient of float32 data with a large spread, against the float64 reference.

Claim checked (forty-ninth session, docs/benchmark_rounds.md): from a spread of about 1e19 the
coefficient a = -w·invstd²·Σdy·x̂/m of dx falls below float32's normal range; before the mend dx
was 3.7e-7 off the reference at 1e20, 4.6e-3 at 1e22 and 4.5e-2 from 1e25 on, on the CPU kernels
and the portable backend alike (torch.nn 100 % off from 1e19). Prints, per spread, each
contender's largest error over an (8, 3, 5, 5) input relative to the reference's largest |dx|.

    PYTHONPATH=src python benchmarks/dx_large_spread.py [--backends portable,cpu,torch]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import bnlab
from bnlab import reference as ref

SPREADS = (1e10, 1e15, 1e18, 1e19, 1e20, 1e22, 1e25, 1e30)


def relative_dx_error(contender: str, spread: float, shape=(8, 3, 5, 5)) -> float:
    """max |dx - dx64| / max |dx64| of one training step of ``contender`` (a bnlab backend or "torch")."""
    gen = torch.Generator().manual_seed(11)
    x = ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * spread).float()
    dy = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).float()
    xg = x.clone().requires_grad_()
    if contender == "torch":
        layer = torch.nn.BatchNorm2d(shape[1])
        layer(xg).backward(dy)
    else:
        layer = bnlab.BatchNorm2d(shape[1])
        bnlab.set_backend(contender)
        try:
            layer(xg).backward(dy)
        finally:
            bnlab.set_backend(None)
    _, cache = ref.forward_train(x.double().numpy(), np.ones(shape[1]), np.zeros(shape[1]), layer.eps)
    dx64 = ref.backward(dy.double().numpy(), cache)[0]
    return float(np.abs(xg.grad.double().numpy() - dx64).max() / np.abs(dx64).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="portable,cpu,torch", help="comma-separated: bnlab backends and/or torch")
    args = p.parse_args(argv)
    contenders = args.backends.split(",")
    known = ["torch", *bnlab.available_backends()]
    if unknown := [c for c in contenders if c not in known]:
        p.error(f"--backends: expected names from {known}, got {unknown}")
    print("spread  " + "  ".join(f"{c:>9s}" for c in contenders))
    for spread in SPREADS:
        print(f"{spread:6.0e}  " + "  ".join(f"{relative_dx_error(c, spread):9.1e}" for c in contenders))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
