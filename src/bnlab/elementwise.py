"""The elementwise phase of BN in torch: normalize in the forward, the input gradient in the backward.

Both take per-channel float64 statistics from the reduce phase (bnlab.stats) and touch every
element once. Arithmetic runs in float32 for fp32/fp16/bf16 inputs and in float64 for float64.
The formulas are derived in docs/math.md §3.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bnlab._memory import memory_readable
from bnlab.stats import Count, accumulate_dtype, channel_sums, compute_dtype, per_channel, split_mean


def _as_f64(v: Tensor | None, like: Tensor, fill: float) -> Tensor:
    """A (C,) float64 copy of an optional per-channel parameter (None means the constant ``fill``)."""
    if v is None:
        return torch.full_like(like, fill, dtype=torch.float64)
    return v.detach().to(torch.float64)


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) · invstd · weight + bias, computed as (x - mean_hi) · scale + shift.

    scale = weight·invstd and shift = bias - mean_lo·scale are per-channel; mean_hi/mean_lo are
    the two halves of the float64 mean (stats.split_mean), so fp32 data far from zero keeps its
    precision. The output has x's dtype and memory format.

    Shapes: x (N, C, *); mean, invstd float64 (C,); weight, bias (C,) or None.
    """
    dtype = compute_dtype(x)
    nd = x.dim()
    hi, lo = split_mean(mean, dtype)
    scale64 = invstd * _as_f64(weight, mean, 1.0)  # (C,)
    shift64 = _as_f64(bias, mean, 0.0) - lo.to(torch.float64) * scale64  # (C,)
    scale, shift = scale64.to(dtype), shift64.to(dtype)
    centered = x.to(dtype) - per_channel(hi, nd)  # (N, C, *)
    y = torch.addcmul(per_channel(shift, nd), centered, per_channel(scale, nd))
    return y.to(x.dtype)


SHIFT_SAMPLE = 16  # dy values per channel centre_shift looks at (the CPU kernels' kShiftSample)


def finite_or_zero(t: Tensor) -> Tensor:
    """t where finite, else 0: for the remainder terms (mean_lo·Σ, the float64 remainder of dy's
    mean), which correct a finite sum by less than its last bit. Where a sum is ±inf (an infinite
    dy) the infinite terms' own signs are the exact answer's, and a remainder could only add
    inf - inf = NaN (or 0·inf), where the float64 reference and torch.nn give ±inf (the CPU
    kernels' finite_or_zero). One operation: on CUDA without Triton each is a launch."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _eager_cpu(t: Tensor) -> bool:
    """Whether t's values may be read on the host here without cost: an eager call (not traced)
    on a CPU tensor that holds its values (not a FakeTensor or other subclass handling its operations
    in Python: bnlab._memory). Elsewhere a read synchronises a GPU, or a traced graph cannot branch on it."""
    return t.device.type == "cpu" and memory_readable(t) and not torch.compiler.is_compiling()


def rounded_mean_term(a: Tensor, lo: Tensor, dtype: torch.dtype, host_check: bool = True) -> Tensor | None:
    """The per-channel t of dx's a·((x - mean_hi) + t), (C,) in ``dtype``, or None where no a is
    infinite, as checked on the host where ``host_check`` allows it and the call is eager on a CPU.

    Why: with a infinite (an infinite dy), a·(x - mean_hi) is 0·inf = NaN at every x equal to
    mean_hi, where the exact x - mean = -mean_lo gives the float64 reference's ±inf. t = -mean_lo
    in such channels, and -0 elsewhere, where x - mean_hi + (-0) has the bits of x - mean_hi, signed
    zeros too (the Triton kernels' rounded_mean_term; docs/math.md §4.2). Adding it costs the input
    gradient one pass and a few (C,) operations more (1.11-1.48x on two CPU threads, two runs,
    benchmarks/portable_rounded_mean.py), so an eager CPU call checks a on the host and skips it
    where a is finite (1.09x at (256, 100), within the noise at the conv shapes). On other devices
    the check would synchronise, a traced graph cannot branch on it, and SyncBatchNorm's steps read
    no value on the host on any device (``host_check`` False; test_sync_distributed.py holds them
    to it on the CPU, for CUDA's sake): there t is always added.
    """
    # a's sum is finite where every a is (a sum that overflows, or a NaN, only adds t = -0); summed
    # in Python: after the passes over x, a torch reduction of C values cost ~15 us at (256, 100)
    if host_check and _eager_cpu(a) and math.isfinite(sum(a.tolist())):
        return None
    return torch.where(torch.isinf(a), -lo.to(torch.float64), -0.0).to(dtype)


def centre_shift(dy: Tensor) -> Tensor:
    """The per-channel g of a centred Σ(dy - g)·x̂ (the CPU kernels' centre_shift), float64 (C,).

    From 16 of a channel's dy values in (sample, position) order, four runs of four a quarter of the
    channel apart (all of them where it has fewer): their mean where it stands out of their range
    (|mean| > max - min), the value itself where the finite ones are all equal, else 0. Why a g
    near dy's mean, and 0 where dy has no common part: Σ(dy - g)·(x - mean) = Σdy·(x - mean) only as
    far as Σ(x - mean) = 0, and the batch mean carries its own rounding δ, which adds δ·Σ(dy - g)
    (docs/math.md §4.2).

    Shapes: dy (N, C, *), non-empty -> (C,).
    """
    c = dy.shape[1]
    per_channel_values = dy.transpose(0, 1).reshape(c, -1)  # (C, N·L) in (sample, position) order
    total = per_channel_values.shape[1]
    i = torch.arange(min(total, SHIFT_SAMPLE), device=dy.device)
    at = i if total < SHIFT_SAMPLE else (i // 4) * (total // 4) + i % 4
    v = per_channel_values[:, at].to(torch.float64)  # (C, k)
    finite = torch.isfinite(v)
    n = finite.sum(1)
    mean = torch.where(finite, v, 0.0).sum(1) / n.clamp(min=1)
    high = torch.where(finite, v, -torch.inf).amax(1)
    low = torch.where(finite, v, torch.inf).amin(1)
    g = torch.where(mean.abs() > high - low, mean, 0.0)
    g = torch.where(high == low, high, g)
    return torch.where(n > 0, g, 0.0)


def grad_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, batch_mean: bool = False) -> tuple[Tensor, Tensor]:
    """The backward's reduce phase: per-channel Σdy and Σdy·x̂ (= dbeta and dgamma), float64 (C,).

    Σdy·x̂ = invstd · (Σdy·(x - mean_hi) - mean_lo · Σdy), so x̂ itself is never materialised.
    Σdy sums dy - g with g a channel's first dy (0 where that is not finite), then adds n·g in
    float64: a float32 sum of a constant gradient is then exact, so that its mean, and the input
    gradient of a channel constant in x and dy, are too (the CPU kernels' grad_shift). With
    ``batch_mean`` (mean is x's own, so Σ(x - mean) = 0), g is :func:`centre_shift`'s (near dy's
    mean where dy has a large common part, else 0), and Σdy·x̂ sums (dy - g)·(x - mean_hi) and takes
    mean_lo · Σ(dy - g) off: where dy has a large common part its products then round far less (the
    CPU kernels' grad_totals).

    Shapes: dy, x (N, C, *); mean, invstd float64 (C,).
    """
    dtype = compute_dtype(x)
    nd = x.dim()
    hi, lo = split_mean(mean, dtype)
    dyc = dy.to(dtype)
    acc = accumulate_dtype(dyc)
    if dyc.numel() == 0:
        shift = dyc.new_zeros(dyc.shape[1])
    elif batch_mean:
        shift = centre_shift(dyc).to(dtype)
    else:
        first = dyc[(0, slice(None)) + (0,) * (nd - 2)]  # (C,)
        shift = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    count = dyc.numel() // max(dyc.shape[1], 1)
    shifted = dyc - per_channel(shift, nd)
    sum_shifted = channel_sums(shifted, acc)
    sum_dy = sum_shifted + count * shift.to(torch.float64)
    factor = shifted if batch_mean else dyc
    sum_dy_xc = channel_sums(factor * (x.to(dtype) - per_channel(hi, nd)), acc)
    sum_dy_xhat = (sum_dy_xc - finite_or_zero(lo.to(torch.float64) * (sum_shifted if batch_mean else sum_dy))) * invstd
    return sum_dy, sum_dy_xhat


def sums_need_mending(x: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor) -> bool:
    """Whether :func:`sums_overflowed_in_float` or :func:`sums_at_rounded_means` may change the
    sums: an eager CPU call whose Σdy or Σdy·x̂ is not finite, read on the host in one pass of
    Python sums over the 2C values (the backward's usual case: finite, and nothing more to do)."""
    return _eager_cpu(x) and not math.isfinite(sum(sum_dy.tolist()) + sum(sum_dy_xhat.tolist()))


def sums_overflowed_in_float(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor
) -> tuple[Tensor, Tensor]:
    """(Σdy, Σdy·x̂), float64 (C,), summed again in float64 where :func:`grad_sums`' sums in the
    compute dtype overflowed although every value is finite (the CPU kernels'
    sums_overflowed_in_float): float32 data near the top of its range (|x| from about 2e36) made
    the products dy·(x - mean_hi) or their float32 sums ±inf, and dweight and dx ±inf or NaN where
    the float64 reference is finite. Only a sum that was not finite is replaced, and only where
    the float64 one is finite (an infinite or NaN value keeps its sums, for
    :func:`sums_at_rounded_means`). As that function, only in an eager CPU call, and nothing more
    unless a sum is not finite (:func:`sums_need_mending`).

    Shapes: dy, x (N, C, *); mean, invstd, sum_dy, sum_dy_xhat float64 (C,).
    """
    if compute_dtype(x) == torch.float64 or not sums_need_mending(x, sum_dy, sum_dy_xhat):
        return sum_dy, sum_dy_xhat
    nd = x.dim()
    dy64 = dy.to(torch.float64)
    s1 = channel_sums(dy64, torch.float64)
    sxh = channel_sums(dy64 * (x.to(torch.float64) - per_channel(mean, nd)), torch.float64) * invstd
    redone = torch.isfinite(s1) & torch.isfinite(sxh) & torch.isfinite(mean) & torch.isfinite(invstd)
    return (torch.where(redone & ~torch.isfinite(sum_dy), s1, sum_dy),
            torch.where(redone & ~torch.isfinite(sum_dy_xhat), sxh, sum_dy_xhat))


def sums_at_rounded_means(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor
) -> Tensor:
    """Σdy·x̂ (C,) float64, recomputed where an infinite dy met an x equal to mean_hi (the CPU
    kernels' sums_at_rounded_means): there (dy - g)·(x - mean_hi) = inf·0 added NaN, where the
    exact x - mean = -mean_lo gives the float64 reference's ±inf. Such a channel has Σdy ±inf and
    Σdy·x̂ NaN; its Σdy·x̂ is summed again from its infinite terms alone, with x - mean in float64
    as (x - mean_hi) - mean_lo (finite terms cannot change an infinite sum; mixed signs still give
    NaN, as in the reference). Only in an eager CPU call, where reading the sums on the host costs
    no synchronisation, and nothing more unless Σdy is not finite (a Python sum of its C values).
    Left as summed on other devices, in traced graphs and in SyncBatchNorm's steps.

    Shapes: dy, x (N, C, *); mean, invstd, sum_dy, sum_dy_xhat float64 (C,).
    """
    if not _eager_cpu(x) or math.isfinite(sum(sum_dy.tolist())):
        return sum_dy_xhat
    dtype, nd = compute_dtype(x), x.dim()
    hi, lo = split_mean(mean, dtype)
    lo64 = lo.to(torch.float64)
    wanted = torch.isinf(sum_dy) & torch.isnan(sum_dy_xhat) & (lo64 != 0) & torch.isfinite(mean)
    if not bool(wanted.any()):
        return sum_dy_xhat
    dy64 = dy.to(torch.float64)
    centered = (x.to(dtype) - per_channel(hi, nd)).to(torch.float64) - per_channel(lo64, nd)
    infinite_terms = torch.where(torch.isfinite(dy64), 0.0, dy64 * centered)
    return torch.where(wanted, channel_sums(infinite_terms, torch.float64) * invstd, sum_dy_xhat)


def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: Count,
) -> Tensor:
    """The backward's elementwise phase: dx = γ·invstd·(dy - Σdy/m - x̂·Σdy·x̂/m).

    Rewritten per channel as dx = k·(dy - g_hi) + a·((x - mean_hi) + t) + c with k = γ·invstd,
    a = -k·invstd·Σdy·x̂/m, g_hi = Σdy/m rounded to the compute dtype and
    c = -k·(Σdy/m - g_hi) - a·mean_lo (t: :func:`rounded_mean_term`, -0 or absent where a is
    finite), so one fused pass over dy and x suffices. dy's mean comes
    off before the product, so k·dy and c do not cancel where dy is nearly constant (a channel
    constant in both x and dy gets dx = 0 exactly). ``count`` (m) may be a tensor after a
    cross-process merge (SyncBatchNorm), whose steps read nothing on the host: then t is always
    added (rounded_mean_term's host_check); only the large-spread check reads, and only in an eager
    CPU call, where a read synchronises nothing (_coefficients_below_normal).

    Shapes: dy, x (N, C, *); mean, invstd, sum_dy, sum_dy_xhat float64 (C,); weight (C,) or None.
    Returns dx with x's dtype.
    """
    dtype = compute_dtype(x)
    nd = x.dim()
    hi, lo = split_mean(mean, dtype)
    m = torch.clamp(count, min=1.0) if isinstance(count, Tensor) else max(count, 1)
    k = _as_f64(weight, mean, 1.0) * invstd
    a = -k * invstd * sum_dy_xhat / m
    # (also with a tensor count, masked BN's or SyncBatchNorm's merged one: the check reads only in an eager CPU call)
    lost = _coefficients_below_normal(x, dtype, k, a, mean, sum_dy, sum_dy_xhat)
    mean_dy = sum_dy / m
    g_hi = mean_dy.to(dtype)
    # the remainders, dropped where not finite (an infinite Σdy or Σdy·x̂: finite_or_zero)
    c = -k * finite_or_zero(mean_dy - g_hi.to(torch.float64)) - finite_or_zero(a * lo.to(torch.float64))
    dx = dy.to(dtype) - per_channel(g_hi, nd)  # a new tensor: dy is never written
    dx.mul_(per_channel(k.to(dtype), nd))
    centered = x.to(dtype) - per_channel(hi, nd)  # a new tensor too
    t = rounded_mean_term(a, lo, dtype, host_check=not isinstance(count, Tensor))  # a tensor: SyncBatchNorm's
    if t is not None:
        centered.add_(per_channel(t, nd))
    dx.addcmul_(centered, per_channel(a.to(dtype), nd))
    dx.add_(per_channel(c.to(dtype), nd))
    if lost is not None:
        dx = _dx_in_float64_where(lost, dx, dy, x, mean, invstd, k, sum_dy, sum_dy_xhat, m)
    return dx.to(x.dtype)


#: The smallest normal float32, the compute dtype of every input but float64 (stats.compute_dtype)
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _coefficients_below_normal(
    x: Tensor, dtype: torch.dtype, k: Tensor, a: Tensor, mean: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor
) -> np.ndarray | None:
    """The (C,) bool channels whose input-gradient coefficient a = -k·invstd·Σdy·x̂/m (or k = γ·invstd)
    is below the compute dtype's normal range, or None where there is none (the usual case), for
    :func:`_dx_in_float64_where` (the CPU kernels' dx_where_coefficients_underflow): float32 data of a
    spread from about 1e19 rounded a to a subnormal or 0, which dropped the x̂ term (dx 4.5 % off the
    float64 reference at a spread of 1e22). Only in an eager CPU call: the (C,) coefficients are read
    on the host, through NumPy: ~20 us of a 90 us input gradient at (256, 100), 1.04-1.08x its
    time at the conv shapes and (8192, 100) (benchmarks/portable_underflow_check.py, two runs).

    Shapes: x (N, C, *); k, a, mean, sum_dy, sum_dy_xhat float64 (C,).
    """
    if dtype == torch.float64 or not _eager_cpu(x):
        return None
    magnitudes = np.abs(np.concatenate((k.detach().numpy(), a.detach().numpy())))  # k and a at once
    below = (magnitudes < _FLOAT32_TINY) & (magnitudes > 0)
    if not below.any():
        return None
    lost = below[: k.shape[0]] | below[k.shape[0] :]
    for v in (mean, sum_dy, sum_dy_xhat):
        lost &= np.isfinite(v.detach().numpy())
    return lost if lost.any() else None


def _dx_in_float64_where(
    lost: np.ndarray, dx: Tensor, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, k: Tensor,
    sum_dy: Tensor, sum_dy_xhat: Tensor, m: float,
) -> Tensor:
    """dx (compute dtype) with the ``lost`` channels computed again in float64 from the sums,
    dx = k·((dy - Σdy/m) - (x - mean)·invstd·Σdy·x̂/m).

    Shapes: lost (C,) bool; dx, dy, x (N, C, *); mean, invstd, k, sum_dy, sum_dy_xhat float64 (C,).
    """
    nd = x.dim()
    dx64 = (dy.to(torch.float64) - per_channel(sum_dy / m, nd)) - (
        (x.to(torch.float64) - per_channel(mean, nd)) * per_channel(invstd * (sum_dy_xhat / m), nd)
    )
    dx64.mul_(per_channel(k, nd))
    return torch.where(per_channel(torch.from_numpy(lost), nd), dx64.to(dx.dtype), dx)
