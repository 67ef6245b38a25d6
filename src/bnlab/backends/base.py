"""The contract every BN backend fulfils: four primitives, two fused compositions of them.

A backend computes the reduce phase (``moments``, ``grad_sums``) and the elementwise phase
(``normalize``, ``grad_input``) of docs/math.md for the tensors it ``supports``. The fused
``forward_train`` and ``backward`` default to composing the primitives; a fast backend
overrides them with kernels that keep a channel's data in cache between phases.
SyncBatchNorm uses the primitives directly, inserting one collective after each reduce phase.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.stats import Count, Moments, count_and_update_, finalize


class Backend:
    """Base class: subclasses implement the four primitives and ``supports``."""

    #: short name used by ``bnlab.set_backend`` and the ``BNLAB_BACKEND`` environment variable.
    name: str = "base"

    def supports(self, x: Tensor) -> bool:
        """Whether this backend handles x's device, dtype and layout."""
        raise NotImplementedError

    # -- reduce phase ------------------------------------------------------------------------
    def moments(self, x: Tensor) -> Moments:
        """Per-channel (count, mean, M2) of x (N, C, *); mean and M2 float64 (C,)."""
        raise NotImplementedError

    def grad_sums(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, batch_mean: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-channel (Σdy, Σdy·x̂), float64 (C,).

        ``batch_mean``: mean is x's own batch mean (the training backward), so Σ(x - mean) = 0 and
        Σdy·x̂ may be summed as Σ(dy - g)·x̂ for any per-channel g, which keeps its digits where dy
        has a large common part (docs/math.md §4.2). False for any other mean (fixed statistics,
        a masked mean, a group's mean): then dy enters whole. (SyncBatchNorm passes each rank's
        own mean and moves the sum to the group's: bnlab.sync_steps.local_grad_sums.)"""
        raise NotImplementedError

    # -- elementwise phase -------------------------------------------------------------------
    def normalize(
        self, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        """y = (x - mean)·invstd·weight + bias, shaped and typed like x."""
        raise NotImplementedError

    def grad_input(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xhat: Tensor,
        count: Count,
    ) -> Tensor:
        """dx = weight·invstd·(dy - Σdy/m - x̂·Σdy·x̂/m), shaped and typed like x."""
        raise NotImplementedError

    # -- fused compositions ------------------------------------------------------------------
    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Moments, Tensor]:
        """Training forward: returns (y, batch moments, invstd)."""
        stats = self.moments(x)
        mean, _, invstd = finalize(stats, eps)
        return self.normalize(x, mean, invstd, weight, bias), stats, invstd

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        count: Count,
        need_input_grad: bool,
        batch_mean: bool = False,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Training backward: returns (dx or None, Σdy·x̂ = dweight, Σdy = dbias); sums float64 (C,).
        ``batch_mean`` as for :meth:`grad_sums`."""
        sum_dy, sum_dy_xhat = self.grad_sums(dy, x, mean, invstd, batch_mean=batch_mean)
        sum_dy, sum_dy_xhat = self.mend_sums(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
        dx = None
        if need_input_grad:
            dx = self.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
        return dx, sum_dy_xhat, sum_dy

    def mend_sums(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(Σdy, Σdy·x̂) (float64 (C,)) as :meth:`backward` hands them on: a backend whose
        :meth:`grad_sums` can give NaN where the reference has ±inf (an infinite dy where x equals
        the mean rounded to its dtype, docs/math.md §4.2), or overflow in its compute dtype where the
        reference is finite, mends them here; the default returns them unchanged."""
        return sum_dy, sum_dy_xhat

    # -- whole-call hooks: a fast backend may fold a whole call into one kernel launch ---------------
    def train_forward(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None = None,
        skip_nonfinite: bool = False,
    ) -> Tensor | None:
        """The whole training forward as one autograd op: output, and the running averages updated.

        ``momentum`` is the weight of the batch. With ``num_batches_tracked`` (a module's counter),
        the backend also adds 1 to it, and ``momentum=None`` means the cumulative factor
        1/num_batches_tracked (after counting), as the module's own bookkeeping would. With
        ``skip_nonfinite``, a batch whose mean or unbiased variance is not finite in some channel
        updates neither the averages nor the counter (bnlab.stats.update_running_stats_'s guard).

        Returns None, having changed nothing, to let the caller take the general path
        (BatchNormTrainFunction, then ``update_running_stats_``). A backend whose per-call overhead
        matters (small inputs) fuses the steps; the results must be those of the general path.
        """
        return None

    def train_forward_stats(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        skip_nonfinite: bool,
    ) -> tuple[Tensor, Tensor]:
        """The training forward without autograd, for bnlab.custom_ops: (y, stats), stats the float64
        (3, C) rows mean, M2, invstd; the running averages and the counter (plain (C,) vectors and a
        one-element int64 tensor, or None) updated in place as the modules update them
        (bnlab.stats.count_and_update_). A fast backend does it in one kernel call."""
        y, moments, invstd = self.forward_train(x, weight, bias, eps)
        if running_mean is not None:
            count_and_update_(running_mean, running_var, num_batches_tracked, moments, momentum, skip_nonfinite)
        return y, torch.stack((moments.mean, moments.m2, invstd))

    def eval_forward(
        self, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor | None:
        """Evaluation-mode output straight from the running buffers when no gradient is needed.

        Returns None to let the caller take the general path (finalize the statistics, then
        ``normalize`` under autograd). Must raise as ``_checks.check_running_var_nonnegative`` does
        for a negative running variance.
        """
        return None

    def eval_statistics(self, running_mean: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor] | None:
        """(mean, invstd) in float64 (C,) from running statistics, invstd = 1/sqrt(var + eps), for the
        eval-mode Function; None to let the caller compute them with torch ops. Must raise as
        ``_checks.check_running_var_nonnegative`` does for a negative running variance."""
        return None

    def eval_backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        need_input_grad: bool,
        need_weight_grad: bool,
        need_bias_grad: bool,
        bias_dtype: torch.dtype | None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
        """First-order gradients of the eval-mode map y = (x - mean)·invstd·weight + bias (fixed
        float64 (C,) mean and invstd): (dx = dy·weight·invstd, Σdy·x̂ in weight's dtype, Σdy in
        bias_dtype), each None when not needed or its parameter is absent.

        Returns None to let the caller evaluate them with torch ops (bnlab.autograd.BatchNormEvalFunction).
        """
        return None

    def __repr__(self) -> str:
        return f"<bnlab backend {self.name!r}>"
