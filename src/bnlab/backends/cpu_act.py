"""The residual add and ReLU after BN on the CPU kernels, for bnlab.BatchNormAct2d (bnlab.fused).

Off the Triton kernels the layer is bnlab.BatchNorm2d's own call (on the CPU its compiled call:
statistics, output, running averages and counter in one kernel call) followed by the add and the
ReLU, which :func:`add_relu_` does in one pass in place on that fresh output, and ReLU's backward
(:func:`relu_backward`) reads its mask from the saved output, as torch's ReLU does, in one pass
into pooled memory. Both are kernels on raw bits (cpu_kernels_relu.inc): torch's bits, but for
NaN payloads of 16-bit types. The torch ops the layer ran before were the slow part:
``torch.where(mask, dy, 0.0)`` alone took 4 ms on a (128, 16, 32, 32) tensor, 14-27x a copy's
time, and torch's bf16 relu_ 2x; the layer's forward+backward ran at 0.28-0.97x the speed of
torch.nn's BN then ReLU, 1.21-4.15x since (docs/benchmark_rounds.md, forty-seventh session).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.backends import cpu_build, cpu_pool
from bnlab.backends.cpu import threads_for
from bnlab.backends.cpu_arguments import _CODE, _like, addressed_like
from bnlab.backends.cpu_layout import fits

__all__ = ["takes", "add_relu_", "relu_backward"]


#: Below this many values torch's own add and ReLU (C++ autograd nodes) cost about as much as, or
#: less than, the kernels' Python node: forward+backward of BatchNormAct2d with the node against
#: bnlab.BatchNorm2d then torch's ops, two threads (benchmarks/act_node_crossover.py, two runs,
#: results/act_node_crossover_xeon_s47.txt): 0.67-0.96x without a residual and 0.79-1.17x with one
#: up to 65,536 values; from 262,144 1.00-1.96x and 1.14-1.60x.
KERNEL_MIN_NUMEL = 1 << 17


def takes(z: Tensor) -> bool:
    """Whether the kernels do act(z + residual) in place: z a dense CPU tensor of a kernel dtype, in
    either layout, large enough (KERNEL_MIN_NUMEL) for a pass to gain more than the call costs."""
    return z.numel() >= KERNEL_MIN_NUMEL and z.is_cpu and z.dtype in _CODE and fits(z) and cpu_build.load() is not None


def add_relu_(z: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """z = act(z + residual) in place, in one pass (torch's add and relu to the bit, NaN payloads of
    16-bit types aside); z: a call's own fresh BN output that the kernels take (:func:`takes`);
    residual None or like z (one in other strides is added by torch first)."""
    lib, code, nt = cpu_build.load(), _CODE[z.dtype], threads_for(z)
    if residual is not None and not addressed_like(residual, z):
        z.add_(residual)
        residual = None
    if residual is not None:
        lib.bn_add_relu(z.data_ptr(), residual.data_ptr(), code, z.numel(), int(relu), nt)
    elif relu:
        lib.bn_relu(z.data_ptr(), code, z.numel(), nt)
    return z


def relu_backward(dy: Tensor, y: Tensor) -> Tensor:
    """ReLU's backward from its output y (which :func:`takes`): +0 where y <= 0, whatever dy there,
    else dy; torch's threshold_backward(dy, y, 0) to the bit, into the kernels' pooled memory (a
    fresh (32, 64, 56, 56) output from malloc faulted its pages in: 2-3 ms of a step)."""
    dy = _like(dy, y)
    dz = cpu_pool.empty_like(y)
    code, nt = _CODE[y.dtype], threads_for(y)
    cpu_build.load().bn_relu_backward(dy.data_ptr(), y.data_ptr(), dz.data_ptr(), code, dz.numel(), nt)
    return dz
