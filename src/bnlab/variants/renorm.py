"""Batch Renormalization (Ioffe, 2017, arXiv:1702.03275): batch statistics corrected towards the running ones.

In training, with the batch's μ_B, σ_B = sqrt(var_B + eps) and the running μ, σ = sqrt(running_var + eps):

    r = clip(σ_B / σ, 1/rmax, rmax),   d = clip((μ_B - μ) / σ, -dmax, dmax)
    y = γ·((x - μ_B)/σ_B · r + d) + β

with r and d treated as constants in the backward (the paper's stop_gradient). That is plain
BN with weight γ·r and bias β + γ·d, which is how it is computed here: autograd then gives
dγ = r·Σdy·x̂_B + d·Σdy and dβ = Σdy, and dx is BN's backward with γ·r, as the paper derives.
With rmax = 1 and dmax = 0, r = 1 and d = 0: plain BN. Evaluation mode is plain BN with the
running statistics. The running averages are updated as for plain BN (torch's convention:
running_var holds the unbiased variance; the paper averages σ itself).

Schedule: the paper starts with rmax = 1, dmax = 0 (plain BN, while the running averages
settle) and relaxes them gradually. ``ramp=(start, end)`` does that linearly over training
steps, counted by ``num_batches_tracked``, on the device (no host sync).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from bnlab import composite, custom_ops, custom_ops_batch_stats
from bnlab.backends import select_backend
from bnlab.stats import Moments, finalize, moments
from bnlab.variants.batch_stats import BatchStatsNormFunction

__all__ = ["check_renorm_options", "renorm_limits", "renorm_correction", "renorm_batch_norm"]


def check_renorm_options(rmax: object, dmax: object, ramp: object) -> tuple[float, float, tuple[int, int] | None]:
    """rmax >= 1 and dmax >= 0 finite numbers; ramp None or (start, end) ints with 0 <= start < end."""
    for name, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a finite float >= {low}, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value < low:
            raise ValueError(f"{name}: expected a finite float >= {low}, got {value!r}")
    if ramp is not None:
        ok = (
            isinstance(ramp, (tuple, list))
            and len(ramp) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in ramp)
            and 0 <= ramp[0] < ramp[1]
        )
        if not ok:
            raise ValueError(
                f"renorm_ramp: expected None or (start, end) training steps with 0 <= start < end, got {ramp!r}"
            )
        ramp = (int(ramp[0]), int(ramp[1]))
    return float(rmax), float(dmax), ramp


def renorm_limits(
    step: Tensor | int, rmax: float, dmax: float, ramp: tuple[int, int] | None
) -> tuple[Tensor | float, Tensor | float]:
    """The clipping limits at a training step: (1, 0) before ``ramp[0]``, (rmax, dmax) from ``ramp[1]`` on, linear between.

    Args:
        step: batches seen before this one (the module's num_batches_tracked), int or 0-dim tensor.
        rmax, dmax: the final limits.
        ramp: (start, end) steps, or None for the final limits from the first step.

    Returns:
        (rmax_now, dmax_now): floats when ``ramp`` is None or ``step`` an int, else float64 0-dim
        tensors on step's device (computed there: no host read of the step).
    """
    if ramp is None:
        return rmax, dmax
    start, end = ramp
    step = step.to(torch.float64) if isinstance(step, torch.Tensor) else float(step)
    t = (step - start) / (end - start)
    if not isinstance(t, torch.Tensor):
        t = min(max(t, 0.0), 1.0)
        return 1.0 + (rmax - 1.0) * t, dmax * t
    t = torch.clamp(t, 0.0, 1.0)
    return 1.0 + (rmax - 1.0) * t, dmax * t


def renorm_correction(
    mean: Tensor, invstd: Tensor, running_mean: Tensor, running_var: Tensor, eps: float, rmax, dmax
) -> tuple[Tensor, Tensor]:
    """r = clip(σ_B/σ, 1/rmax, rmax) and d = clip((μ_B - μ)/σ, -dmax, dmax), float64 (C,), no gradient.

    σ_B = 1/invstd includes eps, and so does σ = sqrt(running_var + eps): a batch whose
    statistics equal the running ones gets r = 1, d = 0 exactly. rmax/dmax are floats or 0-dim tensors.
    """
    sigma = torch.sqrt(running_var.detach().to(torch.float64) + eps)
    # Python floats stay Python floats (torch.as_tensor(float, device=cuda) would be a synchronising copy).
    r = torch.clamp(1.0 / (invstd * sigma), min=1.0 / rmax, max=rmax)
    d = torch.clamp((mean - running_mean.detach().to(torch.float64)) / sigma, min=-dmax, max=dmax)
    return r, d


def renorm_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax,
    dmax,
) -> tuple[Tensor, Moments]:
    """Training-mode Batch Renormalization of x against the running statistics (read, not updated).

    Args:
        x: (N, C, *) input.
        weight, bias: (C,) γ and β, or None for 1 and 0.
        running_mean, running_var: (C,) running averages μ and σ² the batch is corrected towards.
        eps: added to both variances.
        rmax, dmax: clipping limits (floats, or 0-dim tensors from :func:`renorm_limits`).

    Returns:
        ``(y, moments)``: y shaped like x, and the batch's Moments for the running-average update.
    """
    transforming = composite.transforms_active()  # forward-mode AD or torch.func: torch ops throughout
    traced = not transforming and custom_ops.tracing(x)  # torch.compile, torch.export: operators
    with torch.no_grad():
        # Constants for autograd: BatchStatsNormFunction differentiates through the statistics
        # itself, and r, d must not carry a gradient (the paper's stop_gradient).
        # Under forward-mode AD or torch.func: torch ops (the kernels cannot read wrapped tensors) on
        # x.detach(), since no_grad does not stop forward-mode tangents and r, d must carry none.
        if transforming:
            stats = moments(x.detach())
        else:
            stats = custom_ops_batch_stats.moments(x) if traced else select_backend(x).moments(x)
        mean, _, invstd = finalize(stats, eps)
        correction = custom_ops_batch_stats.renorm_correction_of if traced else renorm_correction
        r, d = correction(mean, invstd, running_mean, running_var, eps, rmax, dmax)
    # γ·r and β + γ·d in float64: r and d are constants, autograd carries dγ and dβ back through these.
    gamma = weight.to(torch.float64) if weight is not None else None
    weight_eff = r if gamma is None else gamma * r
    bias_eff = d if gamma is None else gamma * d
    if bias is not None:
        bias_eff = bias_eff + bias.to(torch.float64)
    if transforming:
        return composite.batch_stats_norm(x, weight_eff, bias_eff, None, eps), stats
    if traced:
        return custom_ops_batch_stats.normalize_given_stats(x, weight_eff, bias_eff, mean, invstd, stats.count, None, eps), stats
    y = BatchStatsNormFunction.apply(x, weight_eff, bias_eff, mean, invstd, stats.count, None, eps, select_backend(x))
    return y, stats
