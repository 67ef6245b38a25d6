"""The elementwise ops around BN in bnlab.BatchNormAct2d on the CPU: torch's against the kernels'.

Claim measured: torch.where(mask, dy, 0.0), the old ReLU backward of BatchNormAct2d's CPU path,
is several times slower than torch's own ReLU backward (threshold_backward); the kernels' ReLU,
ReLU backward and add+ReLU on raw bits (cpu_kernels_relu.inc) run at least as fast as torch's
ops, and bf16 ones several times faster. Each op on a (32, 64, 56, 56) and a (128, 16, 32, 32)
tensor, warm, medians of interleaved samples (bnlab.lab.speed_timing), microseconds per call,
with a copy of the same bytes into a buffer allocated once for scale.

    PYTHONPATH=src python benchmarks/relu_ops.py [--rounds 9]
"""

from __future__ import annotations

import argparse

import torch

from bnlab.backends import get_backend
from bnlab.backends.cpu_arguments import _CODE
from bnlab.lab import speed_timing


def ops(shape, dtype):
    """{name: zero-argument callable} on tensors of shape and dtype."""
    lib = get_backend("cpu")._lib
    gen = torch.Generator().manual_seed(0)
    z, dy, r = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    y, mask, out = torch.relu(z), ~(z <= 0), torch.empty_like(z)
    code, n, nt = _CODE[dtype], z.numel(), torch.get_num_threads()
    return {
        "copy_": lambda: out.copy_(z),
        "torch relu_": lambda: out.copy_(z).relu_(),  # (out re-filled each time: relu_ of a relu is idle)
        "kernel relu": lambda: (out.copy_(z), lib.bn_relu(out.data_ptr(), code, n, nt)),
        "torch where(mask, dy, 0)": lambda: torch.where(mask, dy, 0.0),
        "torch threshold_backward (out=)": lambda: torch.ops.aten.threshold_backward.grad_input(dy, y, 0,
                                                                                             grad_input=out),
        "kernel relu backward": lambda: lib.bn_relu_backward(dy.data_ptr(), y.data_ptr(), out.data_ptr(), code, n, nt),
        "torch add_ then relu_": lambda: out.copy_(z).add_(r).relu_(),
        "kernel add+relu": lambda: (out.copy_(z), lib.bn_add_relu(out.data_ptr(), r.data_ptr(), code, n, 1, nt)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {speed_timing.cpu_model()}")
    for shape in ((32, 64, 56, 56), (128, 16, 32, 32)):
        for dtype in (torch.float32, torch.bfloat16):
            fns = ops(shape, dtype)
            seconds = speed_timing.time_interleaved(fns, "cpu", args.rounds, 0.02)
            copy = seconds["copy_"]
            print(f"\n{shape} {str(dtype).replace('torch.', '')}: us per call (and over copy_'s)")
            for name, s in seconds.items():
                print(f"  {name:34s} {s * 1e6:9.1f}  ({s / copy:.2f})")


if __name__ == "__main__":
    main()
