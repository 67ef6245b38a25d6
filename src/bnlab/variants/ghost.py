"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017, arXiv:1705.08741): BN over virtual sub-batches.

In training, the batch is cut along dim 0 into consecutive "ghost" batches of
``virtual_batch_size`` samples (the last one smaller when N is not a multiple), and each is
normalized with its own statistics; γ and β are shared. Evaluation mode is plain BN with the
running statistics, whatever the inference batch size.

Running statistics: one update per forward, with the mean and unbiased variance of the whole
batch (the ghost batches' Moments merged by Chan's rule), as for plain BN. They estimate the
population statistics that evaluation normalizes with, and a virtual batch equal to the batch
gives plain BN exactly. (Hoffer et al.'s Algorithm 1 instead applies the momentum once per
ghost batch; momentum' = 1 - (1 - momentum)^G reproduces that decay rate.)

How: the G full ghost batches are regrouped as a (k, G·C, *) tensor whose channel g·C + c is
channel c of ghost batch g, so one call of an ordinary BN normalization (any backend, its
hand-derived backward) handles them all; γ and β are repeated G times, and autograd sums
their gradients back. A smaller last ghost batch is one more such call.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable

import torch
from torch import Tensor

from bnlab._checks import values_per_channel
from bnlab.stats import Moments, merge_stacked
from bnlab.variants.accumulate import merge_pair

__all__ = ["check_virtual_batch_size", "ghost_batch_norm", "GroupNormalize"]

#: normalize(x', groups) -> (y', moments of the groups·C channels of x'); see :func:`ghost_batch_norm`.
GroupNormalize = Callable[[Tensor, int], "tuple[Tensor, Moments]"]


def check_virtual_batch_size(value: object) -> int | None:
    """None (plain BN) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"virtual_batch_size: expected None or a positive int (samples per ghost batch), got {value!r}"
        )
    return int(value)


def _to_groups(x: Tensor, groups: int) -> Tensor:
    """(G·k, C, *) -> (k, G·C, *): sample i of ghost batch g lands at [i, g·C + c]."""
    n, c = x.shape[0], x.shape[1]
    k = n // groups
    rest = x.shape[2:]
    return x.reshape((groups, k, c) + rest).transpose(0, 1).reshape((k, groups * c) + rest)


def _from_groups(y: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`_to_groups`."""
    k, gc = y.shape[0], y.shape[1]
    c = gc // groups
    rest = y.shape[2:]
    return y.reshape((k, groups, c) + rest).transpose(0, 1).reshape((groups * k, c) + rest)


def _merge_groups(stats: Moments, groups: int) -> Moments:
    """Moments over groups·C channels -> Moments over C channels (Chan's rule across the groups).

    Every group has the same count, a Python int (the count comes from the shape).
    """
    c = stats.mean.numel() // groups
    counts = torch.full((groups,), float(stats.count), dtype=torch.float64, device=stats.mean.device)
    merged = merge_stacked(counts, stats.mean.view(groups, c), stats.m2.view(groups, c))
    return Moments(stats.count * groups, merged.mean, merged.m2)


def ghost_batch_norm(x: Tensor, virtual_batch_size: int, normalize: GroupNormalize) -> tuple[Tensor, Moments]:
    """Training-mode Ghost BN: normalize each ghost batch of x with its own statistics.

    Args:
        x: (N, C, *) input.
        virtual_batch_size: samples per ghost batch (k); a last, smaller ghost batch takes the rest.
        normalize: ``normalize(x', groups)`` normalizes x' of shape (k, groups·C, *) per channel in
            training mode (plain BN, or Batch Renorm) with γ, β (and running statistics) repeated
            ``groups`` times, and returns ``(y', moments)`` over its groups·C channels.

    Returns:
        ``(y, moments)``: y shaped like x; the C-channel Moments of the whole batch.

    Raises:
        ValueError naming virtual_batch_size when a ghost batch would hold one value per channel.
    """
    n = x.shape[0]
    if torch.jit.is_tracing():
        # The split below is Python arithmetic and branches on the batch size: a trace keeps this
        # batch's split, and run at another batch size the traced module normalized wrongly and
        # silently (whole-batch statistics, traced at n <= k) or failed on a shape (torch.jit.script
        # refuses the layer; torch.compile and torch.export follow the batch size).
        warnings.warn(
            f"virtual_batch_size: torch.jit.trace records the split of this batch of {n} sample(s) into ghost "
            f"batches of {virtual_batch_size}; the traced module is right only for batches of {n} in training "
            f"mode (eval mode does not split). Trace with the batch size it will run, or use torch.compile or "
            f"torch.export",
            torch.jit.TracerWarning,
            stacklevel=2,
        )
    if n == 0:
        return normalize(x, 1)
    k = min(virtual_batch_size, n)
    groups, remainder = n // k, n % k  # not divmod: torch.compile(dynamic=True) cannot trace it on a symbolic size
    spatial = values_per_channel(x) // max(n, 1)
    if min(k, remainder or k) * spatial == 1:
        raise ValueError(
            f"virtual_batch_size: a ghost batch of {remainder or k} sample(s) of input {tuple(x.shape)} has 1 value "
            f"per channel, and its statistics are degenerate; choose a virtual_batch_size that divides the batch "
            f"size {n} or leaves a remainder of at least 2"
        )
    if groups == 1 and remainder == 0:
        return normalize(x, 1)
    full = x[: groups * k]
    y_full, stats_full = normalize(_to_groups(full, groups), groups)
    y_full = _from_groups(y_full, groups)
    merged = _merge_groups(stats_full, groups)
    if remainder:
        y_rest, stats_rest = normalize(x[groups * k :], 1)
        y = torch.cat([y_full, y_rest], dim=0)
        merged = merge_pair(merged, stats_rest)
    else:
        y = y_full
    # keep the layout plain BN would keep (channels-last 4-D and 5-D inputs)
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is not None and x.is_contiguous(memory_format=layout):
        y = y.contiguous(memory_format=layout)
    return y, merged
