"""Starting point: forward+backward time of bnlab's portable backend vs torch.nn.BatchNorm2d.

    .venv/bin/python benchmarks/core_baseline.py [--repeats 30]

Interleaves the two implementations, repeat after repeat, and reports medians, so that a
busy machine slows both alike. benchmarks/bench_bn.py is the full benchmark.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import bnlab

SHAPES = [(32, 64, 56, 56), (256, 64, 32, 32)]


def _step(layer, x, dy):
    x.grad = None
    layer(x).backward(dy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backend", default="portable", help="bnlab backend to time (default: portable)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<20} {'torch.nn ms':>12} {'bnlab ms':>10} {'bnlab/torch':>12}")
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        layers = {"torch": torch.nn.BatchNorm2d(shape[1]), "bnlab": bnlab.BatchNorm2d(shape[1])}
        times = {name: [] for name in layers}
        bnlab.set_backend(args.backend)
        for _ in range(3):  # warm-up: allocator, caches
            for layer in layers.values():
                _step(layer, x, dy)
        for _ in range(args.repeats):
            for name, layer in layers.items():
                start = time.perf_counter()
                _step(layer, x, dy)
                times[name].append(time.perf_counter() - start)
        bnlab.set_backend(None)
        t_torch, t_ours = (statistics.median(times[n]) * 1e3 for n in ("torch", "bnlab"))
        print(f"{str(shape):<20} {t_torch:12.2f} {t_ours:10.2f} {t_ours / t_torch:12.2f}x")


if __name__ == "__main__":
    main()
