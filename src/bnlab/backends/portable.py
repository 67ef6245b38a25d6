"""The portable backend: the primitives written with plain torch tensor ops.

Runs on every device and dtype torch supports, and is the fallback when no faster backend
claims a tensor. It is also the shape the fast backends are tested against.
"""

from __future__ import annotations

from torch import Tensor

from bnlab import elementwise, stats
from bnlab.backends.base import Backend


class PortableBackend(Backend):
    """bnlab.stats and bnlab.elementwise, unchanged (the backward mends one non-finite case)."""

    name = "portable"

    def supports(self, x: Tensor) -> bool:
        return True

    def moments(self, x):
        return stats.moments(x)

    def grad_sums(self, dy, x, mean, invstd, batch_mean=False):
        return elementwise.grad_sums(dy, x, mean, invstd, batch_mean)

    def normalize(self, x, mean, invstd, weight, bias):
        return elementwise.normalize(x, mean, invstd, weight, bias)

    def grad_input(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        return elementwise.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)

    def mend_sums(self, dy, x, mean, invstd, sum_dy, sum_dy_xhat):
        """elementwise.sums_overflowed_in_float, then sums_at_rounded_means (eager CPU only;
        SyncBatchNorm calls the primitives, which read nothing on the host), where a sum is not
        finite: one read of the sums on the host decides for both."""
        if not elementwise.sums_need_mending(x, sum_dy, sum_dy_xhat):
            return sum_dy, sum_dy_xhat
        sum_dy, sum_dy_xhat = elementwise.sums_overflowed_in_float(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
        return sum_dy, elementwise.sums_at_rounded_means(dy, x, mean, invstd, sum_dy, sum_dy_xhat)
