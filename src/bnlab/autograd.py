"""torch.autograd Functions for BN with bnlab's hand-derived backward (docs/math.md §3).

``BatchNormTrainFunction`` normalizes with the batch's statistics and returns them for the
running-average update; ``BatchNormEvalFunction`` normalizes with fixed statistics.

First-order gradients run through the selected backend's fused kernels. When the caller asks
for a graph of the gradients (``create_graph=True``, e.g. gradient penalties or
``gradgradcheck``), the same closed-form backward is evaluated with differentiable torch ops
instead, recomputing the statistics from x so that their dependence on x is part of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bnlab import _checks
from bnlab.stats import compute_dtype, per_channel, reduce_dims

if TYPE_CHECKING:  # annotations only: the CPU backend's Functions (backends/cpu_autograd.py) import this module
    from bnlab.backends import Backend


def _differentiable_train_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form training backward in plain torch ops, so autograd can differentiate it again.

    Returns (dx, Σdy·x̂, Σdy); shapes of x, (C,), (C,).
    """
    dtype = compute_dtype(x)
    dims = reduce_dims(x)
    nd = x.dim()
    xc, dyc = x.to(dtype), dy.to(dtype)
    m = max(xc.numel() // max(xc.shape[1], 1), 1)
    mean = xc.mean(dims, keepdim=True)
    centered = xc - mean  # (N, C, *)
    invstd = torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)  # (1, C, 1, ...)
    x_hat = centered * invstd
    sum_dy = dyc.sum(dims)  # (C,)
    sum_dy_xhat = (dyc * x_hat).sum(dims)  # (C,)
    gamma = per_channel(weight.to(dtype), nd) if weight is not None else 1.0
    dx = gamma * invstd * (dyc - per_channel(sum_dy, nd) / m - x_hat * per_channel(sum_dy_xhat, nd) / m)
    return dx.to(x.dtype), sum_dy_xhat, sum_dy


def param_grads(
    sum_dy_xhat: Tensor, sum_dy: Tensor, weight: Tensor | None, bias_dtype: torch.dtype | None, need_w: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """dweight = Σdy·x̂ and dbias = Σdy, cast to the parameters' dtypes; None where not wanted."""
    dw = sum_dy_xhat.to(weight.dtype) if (weight is not None and need_w) else None
    db = sum_dy.to(bias_dtype) if (bias_dtype is not None and need_b) else None
    return dw, db


def differentiable_train_grads(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float, bias_dtype: torch.dtype | None, needs: tuple
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) of training-mode BN as a differentiable graph: every Function's create_graph path.

    ``needs`` is ``ctx.needs_input_grad[:3]`` for (x, weight, bias); unwanted gradients are None.
    """
    dx, sum_dy_xhat, sum_dy = _differentiable_train_backward(dy, x, weight, eps)
    dw, db = param_grads(sum_dy_xhat, sum_dy, weight, bias_dtype, needs[1], needs[2])
    return (dx if needs[0] else None), dw, db


class BatchNormTrainFunction(torch.autograd.Function):
    """y = BN(x) with the batch's own statistics.

    forward(x, weight, bias, eps, backend) -> (y, mean, m2): mean and m2 are the batch's float64
    (C,) statistics, returned (non-differentiable) for the running-average update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: Backend):
        y, stats, invstd = backend.forward_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, stats.mean, invstd)
        ctx.eps = eps
        ctx.count = stats.count
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats.mean, stats.m2)
        return y, stats.mean, stats.m2

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dm2: Tensor | None):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():
            # create_graph=True: a graph of the backward itself is wanted.
            return *differentiable_train_grads(dy, x, weight, ctx.eps, ctx.bias_dtype, (need_x, need_w, need_b)), None, None
        dx, sum_dy_xhat, sum_dy = ctx.backend.backward(dy, x, mean, invstd, weight, ctx.count, need_x, batch_mean=True)
        dw, db = param_grads(sum_dy_xhat, sum_dy, weight, ctx.bias_dtype, need_w, need_b)
        return dx, dw, db, None, None


class BatchNormEvalFunction(torch.autograd.Function):
    """y = BN(x) with fixed statistics: forward(x, weight, bias, mean, invstd, backend) -> y.

    mean and invstd are float64 (C,) and treated as constants (they come from buffers).
    The map is affine in x, so dx = dy·weight·invstd; dweight = Σdy·x̂; dbias = Σdy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, backend: Backend):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.backend = backend
        return backend.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        grads = eval_grads(dy, x, weight, mean, invstd, ctx.needs_input_grad[:3], ctx.bias_dtype, ctx.backend)
        return *grads, None, None, None


def eval_grads(dy, x, weight, mean, invstd, needs, bias_dtype, backend: Backend):
    """(dx, dweight, dbias), each None where not wanted, of the eval-mode map for dy (x's shape).

    needs: (input, weight, bias) flags as ctx.needs_input_grad; mean, invstd: float64 (C,). A first-
    order backward runs the backend's kernels where it has them (Backend.eval_backward); otherwise,
    and under create_graph, differentiable torch ops.
    """
    need_x, need_w, need_b = needs
    if not torch.is_grad_enabled():  # first order: the backend's kernels, where it has them
        grads = backend.eval_backward(dy, x, weight, mean, invstd, need_x, need_w, need_b, bias_dtype)
        if grads is not None:
            return grads
    dtype = compute_dtype(x)
    nd = x.dim()
    dims = reduce_dims(x)
    scale = invstd * (weight.to(torch.float64) if weight is not None else 1.0)
    # Differentiable torch ops throughout: this backward is linear in dy and needs no special
    # double-backward path.
    dx = (dy.to(dtype) * per_channel(scale.to(dtype), nd)).to(x.dtype) if need_x else None
    dw = db = None
    if weight is not None and need_w:
        x_hat = (x.to(dtype) - per_channel(mean.to(dtype), nd)) * per_channel(invstd.to(dtype), nd)
        dw = (dy.to(dtype) * x_hat).sum(dims).to(weight.dtype)
    if bias_dtype is not None and need_b:
        db = dy.to(dtype).sum(dims).to(bias_dtype)
    return dx, dw, db


def eval_statistics(running_mean: Tensor, running_var: Tensor, eps: float, backend) -> tuple[Tensor, Tensor]:
    """(mean, invstd = 1/sqrt(running_var + eps)), float64 (C,), as eval mode normalizes with them:
    the backend's where it computes them, else torch ops. Raises for a negative running variance."""
    stats = backend.eval_statistics(running_mean, running_var, eps)  # raises for a negative variance
    if stats is None:
        _checks.check_running_var_nonnegative(running_var)
        stats = running_mean.detach().to(torch.float64), torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    return stats
