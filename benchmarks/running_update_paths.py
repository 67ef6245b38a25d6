"""Do the CPU kernels' running averages have the bits of the Python update (stats.update_running_stats_)?

Claim checked (forty-ninth session): plain BN updates its running averages inside the kernel call,
Ghost BN (and Batch Renorm, accumulated statistics) in torch ops; with k = N, Ghost BN is plain BN
exactly (docs/features.md), the running averages included. Counts, over --draws random layers of
float32 and bf16 inputs with random running averages, the layers whose float32 running averages
differ between bnlab.BatchNorm2d and bnlab.BatchNorm2d(virtual_batch_size=N) after one step, and
the same for float64 layers.

    PYTHONPATH=src python benchmarks/running_update_paths.py [--draws 300]
"""

from __future__ import annotations

import argparse

import torch

import bnlab
from bnlab.lab.arg_text import positive_int


def differing_layers(dtype: torch.dtype, buffers: torch.dtype, draws: int) -> int:
    """How many of ``draws`` one-step layer pairs (plain, ghost with k = N) end with other running averages."""
    bad = 0
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(8, 16, 4, 4, generator=gen) * 3 + 2).to(dtype)
        pair = [bnlab.BatchNorm2d(16, virtual_batch_size=8, dtype=buffers), bnlab.BatchNorm2d(16, dtype=buffers)]
        start_mean, start_var = torch.randn(16, generator=gen), torch.rand(16, generator=gen) + 0.5
        with torch.no_grad():
            for layer in pair:
                layer.running_mean.copy_(start_mean)
                layer.running_var.copy_(start_var)
            for layer in pair:
                layer(x)
        ghost, plain = pair
        bad += not (torch.equal(ghost.running_mean, plain.running_mean) and torch.equal(ghost.running_var, plain.running_var))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=positive_int, default=300, help="random layer pairs per dtype (default 300)")
    args = p.parse_args(argv)
    bnlab.set_backend("cpu")
    try:
        for dtype, buffers in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
            bad = differing_layers(dtype, buffers, args.draws)
            print(f"{str(dtype)[6:]} input, {str(buffers)[6:]} running averages: {bad} of {args.draws} layers differ")
    finally:
        bnlab.set_backend(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
