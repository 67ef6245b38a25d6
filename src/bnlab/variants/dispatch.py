"""Which normalization a bnlab BatchNorm layer runs with batch statistics: plain, ghost, renorm or masked.

The layer (bnlab.modules) calls :func:`batch_stats_forward` whenever it normalizes with batch
statistics and gets back the output and the batch's Moments, which it then feeds to its
running averages. The math lives in the variant files; this file only chooses and composes.
"""

from __future__ import annotations

from torch import Tensor

from bnlab import _checks, composite, custom_ops
from bnlab.autograd import BatchNormTrainFunction
from bnlab.backends import select_backend
from bnlab.stats import Moments
from bnlab.variants.ghost import ghost_batch_norm
from bnlab.variants.masked import masked_batch_norm
from bnlab.variants.renorm import renorm_batch_norm, renorm_limits

__all__ = ["batch_stats_forward"]


def _repeat(v: Tensor | None, groups: int) -> Tensor | None:
    """γ, β or a running average repeated for ``groups`` ghost batches laid side by side on the channel dim."""
    if v is None or groups == 1:
        return v
    return v.repeat(groups)


def _plain(layer, x: Tensor, groups: int, eps: float) -> tuple[Tensor, Moments]:
    """Plain training-mode BN through the backend's fused forward and hand-derived backward (under
    forward-mode AD or a torch.func transform: bnlab.composite's torch ops; while torch.compile
    traces: the bnlab::batch_norm_train operator)."""
    weight, bias = _repeat(layer.weight, groups), _repeat(layer.bias, groups)
    if composite.transforms_active():  # forward-mode AD or torch.func: differentiable torch ops
        y, mean, m2 = composite.train_forward(x, weight, bias, eps)
    elif custom_ops.tracing(x):  # torch.compile, torch.export: one operator node, the same kernels
        y, mean, m2 = custom_ops.batch_moments(x, weight, bias, eps)
    else:
        y, mean, m2 = BatchNormTrainFunction.apply(x, weight, bias, eps, select_backend(x))
    return y, Moments(_checks.values_per_channel(x), mean, m2)


def _renorm(layer, x: Tensor, groups: int, eps: float) -> tuple[Tensor, Moments]:
    """Batch Renormalization against the layer's running averages, with the ramped limits of this step."""
    rmax, dmax = renorm_limits(layer.num_batches_tracked, layer.rmax, layer.dmax, layer.renorm_ramp)
    return renorm_batch_norm(
        x,
        _repeat(layer.weight, groups),
        _repeat(layer.bias, groups),
        _repeat(layer.running_mean, groups),
        _repeat(layer.running_var, groups),
        eps,
        rmax,
        dmax,
    )


def batch_stats_forward(layer, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Moments]:
    """Normalize x with batch statistics as ``layer``'s options say; return (y, the batch's Moments).

    Ghost batches and Batch Renormalization apply in training mode only; Batch Renormalization
    also needs the running averages to be tracked (they are switched off while
    bnlab.recalibrate measures population statistics, so recalibration sees plain BN).
    A mask selects the positions that enter the statistics.

    Args:
        layer: a bnlab BatchNorm layer (its weight, bias, eps, buffers and feature options are read).
        x: (N, C, *) input, already checked.
        mask: (N, *) bool or None.

    Returns:
        ``(y, moments)`` with y shaped like x and moments over C channels.
    """
    eps = _checks.check_eps(layer.eps)
    ghost = layer.virtual_batch_size is not None and layer.training
    renorm = layer.renorm and layer.training and layer.track_running_stats and layer.running_mean is not None
    if mask is not None:
        if ghost or renorm:
            raise ValueError(
                "mask: masked BN is not available together with virtual_batch_size or renorm=True in training; "
                f"got virtual_batch_size={layer.virtual_batch_size}, renorm={layer.renorm}"
            )
        return masked_batch_norm(x, mask, layer.weight, layer.bias, eps)
    method = _renorm if renorm else _plain

    def normalize(xg: Tensor, groups: int) -> tuple[Tensor, Moments]:
        return method(layer, xg, groups, eps)

    if ghost:
        return ghost_batch_norm(x, layer.virtual_batch_size, normalize)
    return normalize(x, 1)
