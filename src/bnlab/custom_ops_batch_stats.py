"""Normalization with statistics computed beforehand (Batch Renorm, masked BN) as bnlab operators.

The companion of bnlab.custom_ops (read that first: why operators, the fake implementations, the
overload name). Batch Renormalization and masked BN compute the batch statistics first (r and d
depend on them; a mask selects the positions that enter them) and then normalize every position
with them (bnlab.variants.batch_stats.BatchStatsNormFunction). While torch.compile or
torch.export traces such a layer, those kernel calls go through the operators below, so that
the graph stays whole and the compiled layer computes the eager bits:

- ``bnlab::batch_norm_moments(x) -> stats``: float64 (2, C) rows mean and M2 = Σ(x - mean)² over
  (N, *), the backend's ``moments`` (Batch Renorm's statistics; masked BN's are torch ops);
- ``bnlab::batch_norm_renorm_correction(mean, invstd, running_mean, running_var, eps, rmax,
  dmax) -> (r, d)``: Batch Renorm's correction (bnlab.variants.renorm's renorm_correction);
- ``bnlab::batch_norm_given_stats(x, weight?, bias?, mean, invstd, count, count_tensor?, mask?,
  eps) -> y``: BatchStatsNormFunction's forward, y = (x - mean)·invstd·weight + bias, where
  mean and invstd are x's own statistics over ``count`` values (``count_tensor`` instead when
  the count is a tensor, as a mask's is), so its backward differentiates through them;
- ``bnlab::batch_norm_given_stats_backward(dy, x, weight?, mean, invstd, count, count_tensor?,
  mask?, need_input, need_weight, bias_dtype?) -> (dx, dweight, dbias)``: that backward
  (bnlab.variants.batch_stats.batch_stats_backward), 0-element tensors for gradients not wanted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.backends import select_backend
from bnlab.autograd import param_grads
from bnlab.custom_ops import (
    AVAILABLE, OVERLOAD, _grad_fakes, _strided_as_fake, call_backward, define_operators, grad_outputs,
)  # fmt: skip
from bnlab.stats import Moments
from bnlab.variants.batch_stats import batch_stats_backward

__all__ = ["moments", "renorm_correction_of", "normalize_given_stats"]

SCHEMAS = {
    "batch_norm_moments": f"batch_norm_moments.{OVERLOAD}(Tensor x) -> Tensor",
    "batch_norm_renorm_correction": f"batch_norm_renorm_correction.{OVERLOAD}(Tensor mean, Tensor invstd, "
    "Tensor running_mean, Tensor running_var, float eps, Tensor rmax, Tensor dmax) -> (Tensor, Tensor)",
    "batch_norm_given_stats": f"batch_norm_given_stats.{OVERLOAD}(Tensor x, Tensor? weight, Tensor? bias, "
    "Tensor mean, Tensor invstd, float count, Tensor? count_tensor, Tensor? mask, float eps) -> Tensor",
    "batch_norm_given_stats_backward": f"batch_norm_given_stats_backward.{OVERLOAD}(Tensor dy, Tensor x, "
    "Tensor? weight, Tensor mean, Tensor invstd, float count, Tensor? count_tensor, Tensor? mask, "
    "bool need_input, bool need_weight, ScalarType? bias_dtype) -> (Tensor, Tensor, Tensor)",
}


def _moments_impl(x):
    with torch.no_grad():
        stats = select_backend(x).moments(x)
        return torch.stack((stats.mean, stats.m2))


def _moments_fake(x):
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _correction_impl(mean, invstd, running_mean, running_var, eps, rmax, dmax):
    from bnlab.variants.renorm import renorm_correction  # here: that module routes its layers here

    with torch.no_grad():
        return renorm_correction(mean, invstd, running_mean, running_var, eps, rmax, dmax)


def _correction_fake(mean, invstd, running_mean, running_var, eps, rmax, dmax):
    return torch.empty_like(mean), torch.empty_like(mean)


def _given_impl(x, weight, bias, mean, invstd, count, count_tensor, mask, eps):
    with torch.no_grad():
        return _strided_as_fake(select_backend(x).normalize(x, mean, invstd, weight, bias), x)


def _given_fake(x, weight, bias, mean, invstd, count, count_tensor, mask, eps):
    return torch.empty_like(x)


def _given_backward_impl(dy, x, weight, mean, invstd, count, count_tensor, mask, need_input, need_weight, bias_dtype):
    with torch.no_grad():
        n = count_tensor if count_tensor is not None else count
        dx, sum_dy_xhat, sum_dy = batch_stats_backward(dy, x, weight, mean, invstd, n, mask, select_backend(x), need_input)
        return grad_outputs(dx, *param_grads(sum_dy_xhat, sum_dy, weight, bias_dtype, need_weight, True), x)


def _given_backward_fake(dy, x, weight, mean, invstd, count, count_tensor, mask, need_input, need_weight, bias_dtype):
    return _grad_fakes(dy, x, weight, mean, need_input, need_weight, bias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, invstd, count, count_tensor, mask, _eps = inputs
    ctx.save_for_backward(x, weight, mean, invstd, count_tensor, mask)
    ctx.count = count
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _register():
    """Defines the four operators in the ``bnlab`` namespace; returns (library, moments, correction and forward ops)."""
    library = torch.library.Library("bnlab", "FRAGMENT")  # bnlab.custom_ops holds the namespace's DEF
    impls = {
        "batch_norm_moments": (_moments_impl, _moments_fake),
        "batch_norm_renorm_correction": (_correction_impl, _correction_fake),
        "batch_norm_given_stats": (_given_impl, _given_fake),
        "batch_norm_given_stats_backward": (_given_backward_impl, _given_backward_fake),
    }
    op = define_operators(library, SCHEMAS, impls)
    backward_op = op["batch_norm_given_stats_backward"]

    def backward(ctx, dy):
        x, weight, mean, invstd, count_tensor, mask = ctx.saved_tensors
        # mean and invstd are x's own statistics: the backward has differentiated through them
        return call_backward(backward_op, ctx, dy, (x, weight, mean, invstd, ctx.count, count_tensor, mask))

    torch.library.register_autograd(op["batch_norm_given_stats"], backward, setup_context=_setup_context, lib=library)
    return library, op["batch_norm_moments"], op["batch_norm_renorm_correction"], op["batch_norm_given_stats"]


_LIBRARY, _moments_op, _correction_op, _given_op = _register() if AVAILABLE else (None,) * 4


def moments(x: Tensor) -> Moments:
    """x's per-channel Moments (count, float64 mean and M2) through ``bnlab::batch_norm_moments``."""
    rows = _moments_op(x)
    return Moments(x.numel() // x.shape[1], rows[0], rows[1])


def renorm_correction_of(mean: Tensor, invstd: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, rmax, dmax):
    """Batch Renorm's (r, d) through ``bnlab::batch_norm_renorm_correction`` (rmax, dmax: floats or
    0-dim tensors). An operator, not the torch ops of bnlab.variants.renorm.renorm_correction, because
    AOTAutograd's min-cut partitioner recomputes cheap ops in the backward from the graph's
    inputs, and by then the running averages r and d are read from have been updated in place:
    the weight's gradient came out wrong (aot_eager) or the backward failed on a modified saved
    tensor. An operator's outputs are saved instead."""
    bounds = [v if isinstance(v, Tensor) else torch.full((), v, dtype=torch.float64, device=mean.device) for v in (rmax, dmax)]
    return _correction_op(mean, invstd, running_mean, running_var, eps, *bounds)


def normalize_given_stats(x: Tensor, weight, bias, mean: Tensor, invstd: Tensor, count, mask, eps: float) -> Tensor:
    """BatchStatsNormFunction through ``bnlab::batch_norm_given_stats``: y shaped like x, its
    backward differentiating through mean and invstd (x's statistics over ``count`` values, an
    int or a 0-dim tensor, at the positions ``mask`` selects). For validated arguments."""
    if isinstance(count, Tensor):
        return _given_op(x, weight, bias, mean, invstd, -1.0, count, mask, eps)
    return _given_op(x, weight, bias, mean, invstd, float(count), None, mask, eps)
