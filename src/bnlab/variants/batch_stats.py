"""Normalization with batch statistics computed beforehand: the shared core of Batch Renorm and masked BN.

The plain training path (bnlab.autograd.BatchNormTrainFunction) computes the statistics inside
its forward. Batch Renormalization needs them *before* normalizing (r and d are functions of
them), and masked BN computes them from a subset of the positions; both then normalize every
position with those statistics. :class:`BatchStatsNormFunction` does that second half, with the
hand-derived backward of docs/math.md §3 extended to a mask (docs/features.md, "Masked BN"):

    dx = w·invstd·(dy - s·Σdy/m - s·x̂·Σdy·x̂/m),   s = 1 where the mask selects, 0 elsewhere,

where the sums run over every position (every output depends on the statistics) and m is the
number of selected positions. Without a mask s = 1 and this is plain BN's backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.autograd import param_grads
from bnlab.backends import Backend
from bnlab.stats import Count, compute_dtype, per_channel, reduce_dims

__all__ = ["BatchStatsNormFunction", "batch_stats_backward", "expand_mask", "padding_out_of_the_sums"]


def expand_mask(mask: Tensor, ndim: int) -> Tensor:
    """View a (N, *spatial) mask as (N, 1, *spatial) so that it broadcasts against (N, C, *spatial)."""
    return mask.unsqueeze(1) if ndim > 1 else mask


def padding_out_of_the_sums(x: Tensor, dy: Tensor, mask: Tensor) -> Tensor:
    """x with 0 at the unselected positions that hold NaN or ±inf and whose upstream gradient is
    exactly 0 (shapes of x).

    Unselected positions may hold anything, NaN and ±inf included (docs/features.md). Where the
    layer's output there feeds nothing downstream (dy = 0), its terms dy·x̂ of Σdy·x̂ are 0 in exact
    arithmetic, but 0·NaN and 0·inf are NaN in IEEE arithmetic: that NaN reached dweight and every
    selected position's dx. With 0 there the terms are 0·finite; where dy is not 0, x stays
    and a non-finite value counts, as it must. A finite x stays too: under create_graph the
    derivative of Σdy·x̂ in dy at such a position is its own x̂, which the double-backward trick of
    torch.autograd.functional.jvp (dy = 0) reads (zeroing every padded x gave -mean·invstd there:
    the forty-ninth session's audit)."""
    keep = expand_mask(mask, x.dim()) | (dy != 0) | torch.isfinite(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _differentiable_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mask: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same backward written in differentiable torch ops, for ``create_graph=True``.

    The statistics are recomputed from x so that their dependence on x is part of the graph.
    Returns (dx, Σdy·x̂, Σdy) with shapes of x, (C,), (C,).
    """
    dtype = compute_dtype(x)
    dims = reduce_dims(x)
    nd = x.dim()
    xc, dyc = x.to(dtype), dy.to(dtype)
    if mask is None:
        sel = torch.ones_like(xc)
    else:
        xc = padding_out_of_the_sums(xc, dyc, mask)
        sel = expand_mask(mask, nd).to(dtype).expand_as(xc)
    m = torch.clamp(sel.sum(dims, keepdim=True), min=1.0)  # (1, C, 1, ...)
    # where, not multiplication: padded positions may hold anything, NaN included.
    mean = torch.where(sel > 0, xc, 0.0).sum(dims, keepdim=True) / m
    centered = xc - mean
    var = torch.where(sel > 0, centered.square(), 0.0).sum(dims, keepdim=True) / m
    invstd = torch.rsqrt(var + eps)
    x_hat = centered * invstd
    sum_dy = dyc.sum(dims)
    sum_dy_xhat = (dyc * x_hat).sum(dims)
    gamma = per_channel(weight.to(dtype), nd) if weight is not None else 1.0
    correction = sel * (per_channel(sum_dy, nd) + x_hat * per_channel(sum_dy_xhat, nd)) / m
    dx = gamma * invstd * (dyc - correction)
    return dx.to(x.dtype), sum_dy_xhat, sum_dy


def batch_stats_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, count: Count,
                         mask: Tensor | None, backend: Backend, need_input: bool):  # fmt: skip
    """The first-order backward of :class:`BatchStatsNormFunction` on the backend's kernels.

    Returns (dx or None, Σdy·x̂, Σdy): dx shaped like x (None unless ``need_input``), the sums
    float64 (C,). Also the body of ``bnlab::batch_norm_given_stats_backward`` (bnlab.custom_ops)."""
    # Without a mask, mean is x's own batch mean (Batch Renorm), so dy's common part may come off
    # before Σdy·x̂'s products (Backend.grad_sums). A masked mean is not: Σ(x - mean) over every
    # position, which the sums run over, is not 0.
    x_sums = x if mask is None else padding_out_of_the_sums(x, dy, mask)
    dx, sum_dy_xhat, sum_dy = backend.backward(dy, x_sums, mean, invstd, weight, count, need_input,
                                               batch_mean=mask is None)  # fmt: skip
    if dx is not None and mask is not None:
        # Unselected positions do not feed the statistics: only the direct path w·invstd·dy remains.
        dtype = compute_dtype(x)
        nd = x.dim()
        w = weight.detach().to(torch.float64) if weight is not None else 1.0
        direct = dy.to(dtype) * per_channel((w * invstd).to(dtype), nd)
        dx = torch.where(expand_mask(mask, nd), dx.to(dtype), direct).to(x.dtype)
    return dx, sum_dy_xhat, sum_dy


class BatchStatsNormFunction(torch.autograd.Function):
    """y = (x - mean)·invstd·weight + bias, where mean and invstd are x's own (masked) batch statistics.

    forward(x, weight, bias, mean, invstd, count, mask, eps, backend) -> y

    ``mean``, ``invstd`` (float64 (C,)) and ``count`` must be the statistics of x over the
    positions ``mask`` selects (all positions when mask is None); the backward differentiates
    through them. ``weight``/``bias`` may be any (C,) tensors, e.g. γ·r and β + γ·d for Batch
    Renormalization, where autograd carries their gradients back to γ and β.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count: Count, mask, eps: float, backend: Backend):
        ctx.save_for_backward(x, weight, mean, invstd, mask)
        ctx.count = count
        ctx.eps = eps
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return backend.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: a graph of the backward itself is wanted.
            dx, sum_dy_xhat, sum_dy = _differentiable_backward(dy, x, weight, mask, ctx.eps)
        else:
            dx, sum_dy_xhat, sum_dy = batch_stats_backward(dy, x, weight, mean, invstd, ctx.count, mask, ctx.backend, need_x)
        dx = dx if need_x else None
        dw, db = param_grads(sum_dy_xhat, sum_dy, weight, ctx.bias_dtype, need_w, need_b)
        return dx, dw, db, None, None, None, None, None, None
