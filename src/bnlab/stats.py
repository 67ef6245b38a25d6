"""The reduce phase of BN in torch: per-channel statistics, merging them, and the running averages.

Every backend returns statistics in the same form, :class:`Moments`, so that SyncBatchNorm and
the fast kernels share one merge rule and one running-statistics update (docs/math.md §2, §4).

Statistics are float64 (C,) vectors whatever the input dtype: they cost C values, and they let
the elementwise phase centre fp32 data whose |mean| is 1e5 times its std without losing digits.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from bnlab._checks import check_buffers_updatable, check_vmapped_update, values_per_channel

Count = Union[int, Tensor]


class Moments(NamedTuple):
    """Per-channel statistics: count (values per channel), mean (C,) and M2 = Σ(x - mean)² (C,).

    ``count`` is a Python int when it is known from the shape (no device sync), and a 0-dim
    float64 tensor after a cross-process merge, where it depends on other ranks' batches.
    ``mean`` and ``m2`` are float64.
    """

    count: Count
    mean: Tensor
    m2: Tensor


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim 1: [0] for (N, C), [0, 2, 3] for (N, C, H, W)."""
    return [0] + list(range(2, x.dim()))


def per_channel(v: Tensor, ndim: int) -> Tensor:
    """View a (C,) vector as (1, C, 1, ...) so that it broadcasts against an ndim-D input."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def compute_dtype(x: Tensor) -> torch.dtype:
    """Arithmetic dtype of the elementwise phase: float64 stays float64, everything else is float32.

    Half inputs are computed in float32, as PyTorch does (fp32 statistics for fp16/bf16).
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_mean(mean: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Split a float64 mean into ``hi`` (rounded to ``dtype``) and ``lo`` = mean - hi (also in ``dtype``).

    ``x - hi`` is exact for x near the mean (Sterbenz), so ``(x - hi) - lo`` centres fp32 data to
    full precision even when the mean is large; ``x - fp32(mean)`` alone would be off by up to
    half an ulp of the mean, which at mean 1e3 and std 0.01 is 0.3 % of a standard deviation.
    """
    hi = mean.to(dtype)
    lo = (mean - hi.to(torch.float64)).to(dtype)
    return hi, lo


def empty_moments(channels: int, device: torch.device) -> Moments:
    """Statistics of no values: the neutral element of :func:`merge_moments`."""
    zeros = torch.zeros(channels, dtype=torch.float64, device=device)
    return Moments(0, zeros, zeros.clone())


def channel_sums(t: Tensor, acc: torch.dtype) -> Tensor:
    """Σ of t (N, C, *) over every dim but the channel dim, summed in ``acc``: float64 (C,).

    On the CPU with more than two dims, each sample's values first (an (N, C) tensor), then the N
    partial sums in float64. Why: torch's CPU sum over dims (0, 2, ...) of an NCHW tensor, whose
    kept channel dim lies between them in memory, sums each sample's row with its cascade but adds
    the N rows' sums one after another into the float32 result: a relative error of about N·2^-24
    (1e-4 at (6724, 2, 41)), which put the shift of float32 data at 1e3 ± 0.01 a tenth off the mean
    and the variance 1-2.5 % off (benchmarks/fuzz_kernels.py --settings portable, thirty-sixth
    session). Summed apart, the rows (reduced dims adjacent in memory) and the (N, C) partial sums
    each get torch's cascade. CUDA's reductions are trees: there, one sum.
    """
    dims = reduce_dims(t)
    if t.dim() > 2 and t.device.type == "cpu":
        per_sample = t.sum(dims[1:], dtype=acc)  # (N, C)
        return per_sample.sum(0, dtype=torch.float64)
    return t.sum(dims, dtype=acc).to(torch.float64)


def accumulate_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the per-channel sums in the portable path.

    float64 where it is cheap (float64 input, and CUDA, where a reduction is memory-bound and
    converts in registers); float32 on CPU, where a float64 reduction runs ~5x slower. The
    float32 sums stay accurate because they sum *shifted* values (see :func:`moments`).
    """
    if x.dtype == torch.float64 or x.device.type == "cuda":
        return torch.float64
    return torch.float32


def moments(x: Tensor) -> Moments:
    """Per-channel statistics of x (N, C, *) by shifted, scaled sums: Σd and Σd², d = (x - shift)·s.

    ``shift`` is the channel mean rounded to the compute dtype (one cheap first pass), so d is
    small and exact near the mean: then mean = shift + Σd/(s·m) and M2 = (Σd² - (Σd)²/m)/s² lose
    nothing to cancellation (Σd is tiny next to Σd²), unlike the one-pass E[x²] - E[x]².
    ``s`` is a power of two below 1/max|x| per channel ("scale before squaring"): it is exact,
    and it keeps every d² ≤ 4, so fp32 data near 1e18 cannot overflow the sum of squares.
    No value is read on the host (SyncBatchNorm relies on that on CUDA).
    """
    count = values_per_channel(x)
    if count == 0:
        return empty_moments(x.shape[1], x.device)
    dims = reduce_dims(x)
    nd = x.dim()
    xc = x.to(compute_dtype(x))
    acc = accumulate_dtype(xc)
    largest = torch.linalg.vector_norm(xc, ord=float("inf"), dim=dims)  # (C,) max |x|
    _, exponent = torch.frexp(largest)  # largest < 2**exponent; 0 for largest = 0
    # at most the largest finite power of two: a channel of subnormal values (max |x| below 2**-127
    # in float32) would get an infinite scale, and NaN statistics
    exponent = torch.clamp(exponent, min=1 - math.frexp(torch.finfo(xc.dtype).max)[1])
    scale = torch.ldexp(torch.ones_like(largest), -exponent)  # (C,) exact power of two
    xs = xc * per_channel(scale, nd)  # (N, C, *): exact
    # The approximate mean from the scaled values: the same bits (a power of two commutes with
    # the sums' roundings), but the float32 sums of large data (1e37 in 100 values) cannot
    # overflow, which made the shift infinite and the statistics NaN.
    shift_scaled = channel_sums(xs, acc).div_(count).to(xc.dtype)  # (C,) approximate mean · scale
    d = xs.sub_(per_channel(shift_scaled, nd))  # exact near the mean
    s1 = channel_sums(d, acc)
    s2 = channel_sums(d.square(), acc)
    scale64 = scale.to(torch.float64)
    shift = shift_scaled.to(torch.float64) / scale64  # exact
    mean = shift + s1 / (scale64 * count)
    # A channel holding an infinity has no finite scale, and its shifted mean is NaN; its plain
    # mean (the shift, a sum) is what torch.nn's CPU kernel and the reference give: ±inf where the
    # channel holds one kind of infinity and no NaN, else NaN. (Its M2 is NaN either way.)
    mean = torch.where(mean.isnan(), shift, mean)
    # divided by the scale twice: its square underflows in float64 for data beyond 2**537 (0/0 = NaN)
    m2 = torch.clamp(s2 - s1 * s1 / count, min=0.0) / scale64 / scale64
    return Moments(count, mean, m2)


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """Combine statistics of disjoint pieces of one batch (Chan et al.): see reference.merge_moments.

    Works with int or tensor counts, including zero counts, without a host synchronisation.
    """
    if len(parts) == 0:
        raise ValueError("parts: expected at least one Moments to merge, got an empty sequence")
    counts = torch.stack([torch.as_tensor(p.count, dtype=torch.float64, device=p.mean.device) for p in parts])
    means = torch.stack([p.mean for p in parts])  # (K, C)
    m2s = torch.stack([p.m2 for p in parts])  # (K, C)
    return merge_stacked(counts, means, m2s)


def merge_stacked(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    """Merge K pieces given as stacked tensors: counts (K,), means (K, C), m2s (K, C), all float64.

    Uses the K-way form of Chan's rule: with n = Σ nₖ and mean = Σ nₖ meanₖ / n,
    M2 = Σ M2ₖ + Σ nₖ (meanₖ - mean)². Pieces with nₖ = 0 contribute nothing.
    """
    total = counts.sum()
    safe_total = torch.clamp(total, min=1.0)  # an all-empty merge yields mean 0, M2 0, count 0
    weights = (counts / safe_total).unsqueeze(1)  # (K, 1)
    mean = (weights * means).sum(0)  # (C,)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean).square()).sum(0)
    return Moments(total, mean, m2)


def finalize(stats: Moments, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) -> (mean, biased variance, invstd = 1/sqrt(var + eps)), all float64 (C,).

    An empty batch (count 0) gives var 0, so its (empty) output is well defined.
    """
    count = stats.count
    if isinstance(count, Tensor):
        var = stats.m2 / torch.clamp(count, min=1.0)
    else:
        var = stats.m2 / max(count, 1)
    invstd = torch.rsqrt(var + eps)
    return stats.mean, var, invstd


@torch.no_grad()
def update_running_stats_(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stats: Moments,
    momentum: float | Tensor,
    *,
    skip_nonfinite: bool = True,
) -> Tensor:
    """In place: running = (1 - momentum)·running + momentum·batch, with the unbiased batch variance.

    ``momentum`` is the weight of the new batch (PyTorch's convention; the module passes
    1/num_batches_tracked for ``momentum=None``), a float or a 0-dim float64 tensor on the
    statistics' device. A batch with fewer than two values per channel has no unbiased variance
    and leaves the averages untouched, as in PyTorch.

    Non-finite guard (``skip_nonfinite``, on by default): a batch whose mean or unbiased variance
    has a NaN or Inf in *any* channel leaves *both* averages of *every* channel untouched. The
    decision is per layer, not per channel, because a non-finite channel means the step itself
    is bad (an fp16 overflow that a GradScaler will skip), so its finite channels are suspect
    too. It is taken on the device with ``torch.where``: no ``.item()``, no host synchronisation.

    Args:
        running_mean, running_var: (C,) buffers updated in place, or None.
        stats: the batch's Moments (count, float64 mean and M2).
        momentum: weight of the new batch (float, or 0-dim float64 tensor on the device).
        skip_nonfinite: leave the averages unchanged when the batch's statistics are not finite.

    Returns:
        A 0-dim bool tensor on the statistics' device: False when the non-finite guard skipped the
        batch, True otherwise (also for a batch too small to update, which torch.nn still counts).
        The module uses it to leave ``num_batches_tracked`` uncounted for a skipped batch.
    """
    count = stats.count
    device = stats.mean.device
    accepted = torch.ones((), dtype=torch.bool, device=device)
    if isinstance(count, Tensor):
        # Decide on the device: a cross-rank or masked count is a tensor, and reading it would sync the host.
        usable = count > 1
        unbiased = stats.m2 / torch.clamp(count - 1, min=1.0)
    else:
        if count <= 1:
            return accepted
        usable = None
        unbiased = stats.m2 / (count - 1)
    if skip_nonfinite:
        accepted = torch.isfinite(stats.mean).all() & torch.isfinite(unbiased).all()  # 0-dim, on the device
    apply = accepted if skip_nonfinite else None
    if usable is not None:
        apply = usable if apply is None else apply & usable
    for running, batch in ((running_mean, stats.mean), (running_var, unbiased)):
        if running is None:
            continue
        old = running.to(torch.float64)
        new = old * (1 - momentum) + batch * momentum
        if apply is not None:
            # torch.where, not a zero factor: 0 · NaN would still be NaN.
            new = torch.where(apply, new, old)
        running.copy_(new)
    return accepted


def count_and_update_(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    stats: Moments,
    momentum: float | None,
    skip_nonfinite: bool,
) -> None:
    """A module's update for one training batch: counted in ``num_batches_tracked`` as torch.nn counts
    it, then :func:`update_running_stats_`.

    ``momentum=None`` gives the k-th batch the weight 1/k (k counted on the device, so CUDA never
    waits here). Except torch.nn's rule: a batch the non-finite guard skips is not counted (the
    decrement is computed on the device, without a host sync), so ``momentum=None`` keeps giving
    the k-th finite batch the weight 1/k, and a Batch Renorm ramp does not advance on a step the
    optimizer skips. Shared by the modules and by the custom operator of bnlab.custom_ops.
    Inference tensors outside torch.inference_mode(), and unbatched statistics under vmap, are
    refused first, with nothing changed (_checks.check_buffers_updatable, check_vmapped_update).
    """
    check_buffers_updatable(running_mean, running_var, num_batches_tracked)
    check_vmapped_update(running_mean, running_var, stats.mean)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is not None:
        factor = momentum
    elif num_batches_tracked is not None:
        factor = 1.0 / num_batches_tracked.to(torch.float64)
    else:
        factor = 0.0  # no counter to average by: torch.nn's factor then, the averages left as they are
    accepted = update_running_stats_(running_mean, running_var, stats, factor, skip_nonfinite=skip_nonfinite)
    if num_batches_tracked is not None and skip_nonfinite:
        num_batches_tracked.sub_((~accepted).to(num_batches_tracked.dtype))
