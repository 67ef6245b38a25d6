"""Masked BN: statistics over the positions a boolean mask selects, as Keras and Flax allow.

``BatchNorm*d(...)(x, mask=m)`` with m of shape (N, *spatial) (x without its channel axis):
each channel's mean and variance are taken over the positions where m is True only (padding
in a batch of variable-length sequences, say), and *every* position is then normalized with
them, as in Keras and Flax. In evaluation mode the running statistics are used and the mask
has no effect. The backward is BatchStatsNormFunction's (docs/features.md, "Masked BN").

The number of selected positions is data, not shape: it stays a 0-dim float64 tensor on the
device, so masked BN never synchronises with the host. A batch with fewer than two selected
positions leaves the running statistics untouched (bnlab.stats.update_running_stats_).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import composite, custom_ops, custom_ops_batch_stats
from bnlab.backends import select_backend
from bnlab.stats import Moments, compute_dtype, finalize, per_channel, reduce_dims, split_mean
from bnlab.variants.batch_stats import BatchStatsNormFunction, expand_mask

__all__ = ["check_mask", "masked_moments", "masked_batch_norm"]


def check_mask(mask: object, x: Tensor) -> Tensor:
    """mask must be a bool tensor of shape (N, *spatial) = x.shape without dim 1, on x's device."""
    expected = (x.shape[0],) + tuple(x.shape[2:])
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool torch.Tensor of shape {expected} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = use this position's value), got {mask.dtype}")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask: expected shape {expected} (the input's shape {tuple(x.shape)} without the channel dim 1), "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"mask: expected a tensor on the input's device {x.device}, got one on {mask.device}")
    return mask


def masked_moments(x: Tensor, mask: Tensor) -> Moments:
    """Per-channel (count, mean, M2) of x (N, C, *) over the positions where mask (N, *) is True.

    Two passes like bnlab.stats.moments (float64 accumulation, centred squares). Unselected
    positions are excluded with torch.where, so padding holding NaN or Inf does not leak in.
    ``count`` is a 0-dim float64 tensor (no host sync); with count 0 the mean and M2 are 0.
    """
    dims = reduce_dims(x)
    nd = x.dim()
    sel = expand_mask(mask, nd)  # (N, 1, *)
    count = mask.sum(dtype=torch.float64)  # same for every channel
    xc = x.to(compute_dtype(x))
    zero = torch.zeros((), dtype=xc.dtype, device=x.device)
    mean = torch.where(sel, xc, zero).sum(dims, dtype=torch.float64) / torch.clamp(count, min=1.0)  # (C,)
    hi, lo = split_mean(mean, xc.dtype)
    centered = xc - per_channel(hi, nd) - per_channel(lo, nd)  # (N, C, *)
    m2 = torch.where(sel, centered, zero).to(torch.float64).square_().sum(dims)  # (C,)
    return Moments(count, mean, m2)


def masked_batch_norm(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Moments]:
    """Training-mode masked BN: normalize all of x with the statistics of its selected positions.

    Args:
        x: (N, C, *spatial) input.
        mask: (N, *spatial) bool; True marks the positions that enter the statistics.
        weight, bias: (C,) affine parameters or None.
        eps: added to the variance.

    Returns:
        ``(y, moments)``: y shaped like x, and the masked Moments for the running statistics.

    Shape: x (N, C, *); mask (N, *); y (N, C, *).
    """
    check_mask(mask, x)
    transforming = composite.transforms_active()  # forward-mode AD or torch.func: torch ops throughout
    with torch.no_grad():  # BatchStatsNormFunction differentiates through the statistics itself
        # x.detach() under forward-mode AD: no_grad does not stop its tangents (the running
        # averages take values only; the output's statistics are recomputed differentiably)
        stats = masked_moments(x.detach() if transforming else x, mask)
        mean, _, invstd = finalize(stats, eps)
    if transforming:
        return composite.batch_stats_norm(x, weight, bias, mask, eps), stats
    if custom_ops.tracing(x):  # torch.compile, torch.export: one operator node, the same kernels
        return custom_ops_batch_stats.normalize_given_stats(x, weight, bias, mean, invstd, stats.count, mask, eps), stats
    y = BatchStatsNormFunction.apply(x, weight, bias, mean, invstd, stats.count, mask, eps, select_backend(x))
    return y, stats
