"""BatchNorm in differentiable torch ops, for the autodiff transforms bnlab's kernels cannot serve.

bnlab's BN runs as compiled kernels inside autograd Functions with a hand-derived backward. Those
have no forward-mode derivative and no functorch rules, and the kernels read raw data pointers,
which functorch's wrapped tensors do not have. Under forward-mode AD (``torch.autograd.forward_ad``,
``torch.func.jvp``) or any torch.func transform (``grad``, ``vmap``, ``jacrev``, ...), bnlab
therefore computes the same formulas here in plain torch ops, in float64, and lets torch
differentiate and batch them. Before this path existed, forward-mode AD under ``torch.no_grad``
silently returned no tangent from an eval-mode layer.

The same holds under ``torch.jit.trace`` (and the TorchScript-based ``torch.onnx.export``), which
records the torch operators a call runs: an output the kernels wrote through a raw pointer would
enter the trace as a constant, and the traced model would return the example's output for every
input. (In evaluation mode ``bnlab.functional`` records torch's own ``aten::batch_norm`` instead,
the operator ONNX and TorchScript's optimizations know.)

Shapes: x is (N, C, *); weight, bias, running_mean, running_var are (C,) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = ["transforms_active", "train_forward", "eval_forward", "batch_stats_norm"]

#: Whether a torch.func transform is active (False on a torch without the query).
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
#: Whether torch.jit.trace is recording (torch.jit.is_tracing: TorchDynamo folds it to a constant,
#: where it cannot trace torch._C._is_tracing).
jit_tracing = torch.jit.is_tracing


def transforms_active() -> bool:
    """Whether a forward-mode AD level or a torch.func transform is active, or torch.jit.trace is
    recording (then: this module's path)."""
    return functorch_active() or getattr(forward_ad, "_current_level", -1) >= 0 or jit_tracing()


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) vector in float64, shaped to broadcast against x (N, C, *)."""
    return v.to(torch.float64).reshape([1, -1] + [1] * (x.dim() - 2))


def _affine(xhat: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y.to(x.dtype)


def _batch_statistics(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | int]:
    """(x - mean, mean, M2, count) of x over the positions ``mask`` (N, *) selects (all when None),
    float64 and differentiable, mean and M2 kept as (1, C, 1, ...); count an int, or a 0-dim
    float64 tensor with a mask (the same for every channel)."""
    dims = [0, *range(2, x.dim())]
    x64 = x.to(torch.float64)
    if mask is None:
        mean = x64.mean(dims, keepdim=True)
        centered = x64 - mean
        return centered, mean, (centered * centered).sum(dims, keepdim=True), x.numel() // x.shape[1]
    sel = mask.unsqueeze(1)  # (N, 1, *): broadcasts over channels
    count = torch.clamp(mask.sum(dtype=torch.float64), min=1.0)
    # where, not multiplication: unselected positions may hold anything, NaN included
    mean = torch.where(sel, x64, 0.0).sum(dims, keepdim=True) / count
    centered = x64 - mean
    return centered, mean, torch.where(sel, centered * centered, 0.0).sum(dims, keepdim=True), count


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, m2) as BatchNormTrainFunction returns them: y in x's dtype, the batch's float64
    (C,) mean and sum of squared deviations (detached: they feed the running averages only)."""
    centered, mean, m2, count = _batch_statistics(x, None)
    y = _affine(centered * torch.rsqrt(m2 / count + eps), x, weight, bias)
    return y, mean.reshape(-1).detach(), m2.reshape(-1).detach()


def eval_forward(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, in x's dtype."""
    x64 = x.to(torch.float64)
    xhat = (x64 - _per_channel(running_mean, x)) * torch.rsqrt(_per_channel(running_var, x) + eps)
    return _affine(xhat, x, weight, bias)


def batch_stats_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None, eps: float) -> Tensor:
    """BatchStatsNormFunction's output (Batch Renorm, masked BN): x normalized with its own
    statistics over the positions ``mask`` (N, *) selects (all when None), recomputed here so that
    torch differentiates through them. weight/bias: any (C,) tensors (γ·r and β + γ·d for Renorm)."""
    centered, _, m2, count = _batch_statistics(x, mask)
    return _affine(centered * torch.rsqrt(m2 / count + eps), x, weight, bias)
