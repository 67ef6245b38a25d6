"""Gradient-accumulation-aware running statistics: one update per optimizer step, not per micro-batch.

With gradient accumulation over k micro-batches, plain BN updates its running averages k times
per optimizer step, each time with a small, noisy micro-batch. With
``BatchNorm*d(..., accumulation_steps=k)`` the layer instead merges the k micro-batches' exact
statistics (Chan's rule, bnlab.stats.merge_moments) and updates the running averages once, with
the statistics of the one big batch: the result equals training with the whole batch at once,
and ``num_batches_tracked`` (and ``momentum=None``'s 1/n weights) count optimizer steps.

The pending statistics are plain Python state of the layer, not buffers: they are not saved in
the state dict, and DistributedDataParallel's buffer broadcast leaves each rank's own alone.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from bnlab.stats import Moments, merge_stacked

__all__ = ["check_accumulation_steps", "merge_pair", "StatsAccumulator"]


def merge_pair(a: Moments, b: Moments) -> Moments:
    """Chan's merge of two Moments without moving a Python number to the device.

    bnlab.stats.merge_moments turns int counts into device tensors with ``torch.as_tensor``,
    a host-to-device copy that synchronises CUDA; this runs once per training step, so int
    counts stay Python numbers here (and a tensor count is met with ``torch.full``, a kernel).
    """
    if not isinstance(a.count, Tensor) and not isinstance(b.count, Tensor):
        n = a.count + b.count
        if n == 0:
            return a
        delta = b.mean - a.mean
        mean = a.mean + delta * (b.count / n)
        # A channel with an infinite mean in one part: delta is ±inf and a.mean + delta·w is
        # inf - inf = NaN, where the whole batch's mean is that infinity (the guard off; as
        # merge_stacked's weighted sum gives it). The weighted sum there, the delta form elsewhere
        # (its bits, and its accuracy for close means).
        mean = torch.where(delta.isfinite(), mean, a.mean * (a.count / n) + b.mean * (b.count / n))
        return Moments(n, mean, a.m2 + b.m2 + delta.square() * (a.count * b.count / n))
    device = a.mean.device
    counts = torch.stack(
        [c.to(torch.float64) if isinstance(c, Tensor) else torch.full((), float(c), dtype=torch.float64, device=device)
         for c in (a.count, b.count)]
    )
    return merge_stacked(counts, torch.stack([a.mean, b.mean]), torch.stack([a.m2, b.m2]))


def check_accumulation_steps(value: object) -> int:
    """A positive int: 1 updates at every training forward (torch's behaviour)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"accumulation_steps: expected a positive int (micro-batches per optimizer step), got {value!r}"
        )
    return int(value)


class StatsAccumulator:
    """Collects the Moments of micro-batches until ``steps`` of them are in, then hands back their merge."""

    def __init__(self) -> None:
        self.pending: Moments | None = None
        self.micro_batches = 0

    def add(self, stats: Moments, steps: int) -> Moments | None:
        """Add one micro-batch; return the merged Moments when this makes ``steps`` of them, else None."""
        # detached: kept across steps, they must not hold the step's graph (under torch.compile
        # the statistics came out attached, and the next micro-batch's backward ran into the
        # previous, freed graph)
        stats = Moments(stats.count, stats.mean.detach(), stats.m2.detach())
        self.pending = stats if self.pending is None else merge_pair(self.pending, stats)
        self.micro_batches += 1
        if self.micro_batches >= steps:
            return self.pop()
        return None

    def pop(self) -> Moments | None:
        """The merged Moments of the micro-batches collected so far (None if there are none), and reset."""
        stats, self.pending, self.micro_batches = self.pending, None, 0
        return stats
