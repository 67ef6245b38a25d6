"""BN (+ residual) + ReLU on the CPU kernels, for bnlab.BatchNormAct2d (bnlab.fused).

The training forward is one kernel call (statistics, output, running averages and counter, as
CpuBackend.train_forward), then the residual add and the ReLU in one pass, in place on that fresh
output (cpu_kernels_relu.inc): no intermediate tensor, no mask. BatchNormActFunction saves the
output instead, as torch's ReLU keeps its result, and the backward masks dy from it (ReLU's
backward, +0 where y <= 0 whatever dy there) in one pass into pooled memory before the backward
kernel. The torch ops this replaced were the slow part: ``torch.where(mask, dy, 0.0)`` alone took
4 ms on a (128, 16, 32, 32) tensor, 14-27x a copy's time, and torch's bf16 relu_ 2x; the layer's
forward+backward ran at 0.28-0.97x the speed of torch.nn's BN then ReLU, 1.25-4.15x since
(docs/benchmark_rounds.md, forty-seventh session).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.backends import cpu_pool
from bnlab.backends.cpu_arguments import _CODE, _like, addressed_like, is_plain_vector
from bnlab.backends.cpu_layout import fits

__all__ = ["CpuActMixin"]


def _plain_counter(counter: Tensor | None) -> bool:
    """None, or what the kernels count a batch in: an int64 one-element CPU tensor."""
    return counter is None or (counter.is_cpu and counter.dtype == torch.int64 and counter.numel() == 1)


class CpuActMixin:
    """act_forward / act_backward / act_eval of the CPU backend (the contract of TritonBackend's)."""

    def act_forward(self, x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, residual, relu):
        """(y, saved) for y = act(BN(x) + residual) in training, or None for the generic path.

        x: (N, C, H, W) in either layout the kernels take (else None); residual: None or like x.
        Running averages, batch counter and non-finite guard updated as in train_forward.
        """
        if not (fits(x) and is_plain_vector(running_mean) and is_plain_vector(running_var) and _plain_counter(counter)):
            return None
        y, stats, plan = self.forward_stats(x, weight, bias, eps, running_mean, running_var, momentum, counter, guard)
        self._add_relu_(y, residual, relu, plan[4], plan[5])
        return y, (stats, plan)

    def _add_relu_(self, y, residual, relu, code, nt):
        """y = act(y + residual) in place, by the kernels (cpu_kernels_relu.inc: torch's add and
        relu to the bit, but for NaN payloads of 16-bit types), in one pass: y is a call's own fresh
        output, dense, of dtype code ``code``; residual None or like y (a residual in other strides
        is added by torch)."""
        if residual is not None and not addressed_like(residual, y):
            y.add_(residual)
            residual = None
        if residual is not None:
            self._lib.bn_add_relu(y.data_ptr(), residual.data_ptr(), code, y.numel(), int(relu), nt)
        elif relu:
            self._lib.bn_relu(y.data_ptr(), code, y.numel(), nt)

    def act_backward(self, dy, x, weight, saved, need_dx, need_res, dweight, dbias, output=None):
        """(dx, dresidual) of act_forward's output y; writes dweight/dbias (tensors or None) in place.

        output: y, which BatchNormActFunction saved for ReLU's mask (None without ReLU).
        """
        stats, plan = saved
        dz = dy
        if output is not None:
            # torch's ReLU backward (+0 where y <= 0, whatever dy there; bn_relu_backward), into the pool's
            # reused memory: a fresh (32, 64, 56, 56) output from malloc faulted its pages in, 2-3 ms
            dy = _like(dy, output)
            dz = cpu_pool.empty_like(output)
            self._lib.bn_relu_backward(dy.data_ptr(), output.data_ptr(), dz.data_ptr(), plan[4], dz.numel(), plan[5])
        dx = self.backward_fused(dz, x, stats, weight, plan, need_dx, dweight, dbias)
        return dx, (dz if need_res else None)

    def act_eval(self, x, running_mean, running_var, weight, bias, eps, residual, relu):
        """act(BN_eval(x) + residual) without autograd, or None for the generic path."""
        y = self.eval_forward(x, running_mean, running_var, weight, bias, eps)
        if y is None:
            return None
        if not fits(y):  # (a view's output laid out as the view: torch's ops)
            y = y.add_(residual) if residual is not None else y
            return y.relu_() if relu else y
        nt = torch.get_num_threads() if y.numel() >= self.parallel_min_numel else 1
        self._add_relu_(y, residual, relu, _CODE[y.dtype], nt)
        return y
