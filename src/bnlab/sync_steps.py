"""The two halves of SyncBatchNorm's training step, shared by its eager autograd Function
(bnlab.sync) and its operators for torch.compile (bnlab.custom_ops_sync), so that both compute
the same bits.

Each half is the single-process computation with one collective after its reduce phase
(bnlab.distributed; docs/math.md §2 and §3): the forward all-gathers every rank's
(count, mean, M2), the backward all-reduces (Σdy, Σdy·x̂) before the input gradient.

A rank sums Σdy·x̂ about its own batch mean and moves it to the group's in float64
(:func:`local_grad_sums`), so that, as in single-process training, dy's common part comes off
before the products (docs/math.md §4.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import _checks
from bnlab.autograd import param_grads
from bnlab.backends import Backend
from bnlab.distributed import all_reduce_grad_sums, gather_moments
from bnlab.elementwise import finite_or_zero
from bnlab.stats import finalize

__all__ = ["sync_forward", "sync_backward", "local_grad_sums"]


def _raise_if_one_value(local_count: int, counts: Tensor) -> None:
    """Raise the same ValueError on every rank when the group's batch has one value per channel.

    Only a rank whose own batch has at most one value per channel reads the gathered counts
    (one device-to-host copy, on CUDA a wait for the all_gather): a rank with two or more knows
    without looking that the global count is >= 2. If the global count is 1, every rank has at
    most one value, so every rank looks and every rank raises, after the collective that all of
    them joined: none is left waiting in a collective that its peers never enter. The message
    holds only what every rank knows, so it is the same everywhere.
    """
    if local_count > 1:
        return
    per_rank = [int(c) for c in counts.tolist()]
    if sum(per_rank) == 1:
        raise ValueError(
            f"input: expected more than 1 value per channel when training, got 1 value per channel over "
            f"the {len(per_rank)} processes of the group (values per channel on each rank: {per_rank}); "
            f"every rank raises this same error; use eval mode or a larger batch"
        )


def sync_forward(x: Tensor, weight, bias, eps: float, process_group, backend: Backend):
    """y = BN(x) with the statistics of the whole group's batch; one all_gather.

    Returns:
        ``(y, count, mean, m2, invstd, local_mean)``: y shaped like x; the group's float64
        statistics, count 0-dim and mean, M2, invstd (C,); and this rank's own float64 batch mean
        (C,), which the backward sums about (:func:`local_grad_sums`).
    """
    local = backend.moments(x)
    stats, counts = gather_moments(local, process_group)  # collective 1 of 2
    _raise_if_one_value(_checks.values_per_channel(x), counts)
    mean, _, invstd = finalize(stats, eps)
    y = backend.normalize(x, mean, invstd, weight, bias)
    return y, stats.count, stats.mean, stats.m2, invstd, local.mean


def local_grad_sums(dy: Tensor, x: Tensor, local_mean: Tensor, mean: Tensor, invstd: Tensor, backend: Backend):
    """This rank's share of the group's (Σdy, Σdy·x̂), with x̂ = (x - mean)·invstd about the group's mean.

    Σdy·(x - mean) = Σdy·(x - local_mean) + (local_mean - mean)·Σdy. The first sum is about x's
    own batch mean, where Σ(x - local_mean) = 0, so the kernels may take dy's common part off
    before the products (``batch_mean``; docs/math.md §4.2): summed whole about the group's mean,
    a gradient such as 8 + 0.01·noise lost its digits to the rounding of products 800 times
    larger than what survives the sum. The second term is one float64 product per channel.

    Shapes: dy, x (N, C, *) this rank's rows; local_mean, mean, invstd float64 (C,).
    Returns (Σdy, Σdy·x̂), float64 (C,).
    """
    sum_dy, sum_dy_xhat = backend.grad_sums(dy, x, local_mean, invstd, batch_mean=True)
    # Not finite: a rank with no rows (Σdy = 0, a placeholder local mean) where the group's mean is
    # not finite adds nothing rather than 0·inf; with an infinite Σdy (an infinite dy) the first
    # sum's infinite terms carry the answer's sign, as the kernels' remainders are dropped there
    # (bnlab.elementwise.finite_or_zero).
    moved = finite_or_zero((local_mean - mean).mul_(invstd).mul_(sum_dy))
    return sum_dy, sum_dy_xhat + moved


def sync_backward(
    dy: Tensor, x: Tensor, weight, mean: Tensor, invstd: Tensor, count: Tensor, local_mean: Tensor, process_group,
    backend: Backend, needs: tuple, bias_dtype: torch.dtype | None,
):  # fmt: skip
    """(dx, dweight, dbias) of :func:`sync_forward`, None where ``needs`` (x, weight, bias) says not wanted.

    Parameter gradients stay local (DDP reduces them); dx needs the group's sums, so the
    all_reduce runs only when dx is wanted. ``needs`` is a property of the model, equal on every
    rank, so either every rank enters that collective or none does.
    """
    sum_dy, sum_dy_xhat = local_grad_sums(dy, x, local_mean, mean, invstd, backend)
    dx = None
    if needs[0]:
        total_dy, total_dy_xhat = all_reduce_grad_sums(sum_dy, sum_dy_xhat, process_group)  # 2 of 2
        dx = backend.grad_input(dy, x, mean, invstd, weight, total_dy, total_dy_xhat, count)
    dw, db = param_grads(sum_dy_xhat, sum_dy, weight, bias_dtype, needs[1], needs[2])
    return dx, dw, db
