"""Where the CPU kernels' add+ReLU node after BN gains over torch's own add and ReLU nodes.

Claim measured: bnlab.BatchNormAct2d's kernel node (bnlab.fused.AddReluFunction: one pass in
place, ReLU's backward into pooled memory, but a Python autograd node) against bnlab.BatchNorm2d
followed by torch's add and ReLU (C++ nodes), forward+backward, NCHW, float32 and bf16, with and
without a residual, by tensor size; the bound below which the layer takes torch's ops
(bnlab.backends.cpu_act.KERNEL_MIN_NUMEL) comes from it. The bound is set to 0 here, so that the
layer always takes the kernels. Medians of interleaved samples.

    PYTHONPATH=src python benchmarks/act_node_crossover.py
"""

from __future__ import annotations

import torch

import bnlab
from bnlab.backends import cpu_act
from bnlab.lab import speed_timing

SHAPES = [(8, 16, 4, 4), (1, 32, 32, 32), (32, 32, 8, 8), (16, 64, 16, 16), (32, 64, 32, 32), (32, 64, 56, 56)]


def main() -> None:
    cpu_act.KERNEL_MIN_NUMEL = 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {speed_timing.cpu_model()}")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            for residual in (False, True):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
                dy = torch.randn(shape, generator=gen).to(dtype)
                res = torch.randn(shape, generator=gen).to(dtype).requires_grad_() if residual else None
                act, bn = bnlab.BatchNormAct2d(shape[1], residual=residual), bnlab.BatchNorm2d(shape[1])
                extra = [res] if residual else []
                act_inputs, bn_inputs = [x, *act.parameters(), *extra], [x, *bn.parameters(), *extra]

                def kernels():
                    return torch.autograd.grad(act(x, res) if residual else act(x), act_inputs, dy)

                def torch_ops():
                    return torch.autograd.grad(torch.relu(bn(x) + res if residual else bn(x)), bn_inputs, dy)

                t = speed_timing.time_interleaved({"kernels": kernels, "torch": torch_ops}, "cpu", 7, 0.02)
                print(f"{str(dtype)[6:]:8s} {str(shape):18s} {x.numel():8d} {'residual' if residual else '        '} "
                      f"kernel node {t['kernels'] * 1e6:9.1f} us, torch's nodes {t['torch'] * 1e6:9.1f} us: "
                      f"{t['torch'] / t['kernels']:.2f}x")


if __name__ == "__main__":
    main()
