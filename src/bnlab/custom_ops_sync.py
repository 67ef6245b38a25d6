"""SyncBatchNorm's training step as bnlab operators, so that a compiled model keeps it whole.

The companion of bnlab.custom_ops (read that first: why operators, the fake implementations, the
overload name). Across processes, SyncBatchNorm's eager autograd Function calls the kernels and
torch.distributed's collectives from Python, where TorchDynamo cannot follow: a compiled model
broke its graph at every such layer, and torch.export failed. While torch.compile or
torch.export traces the layer, its step goes through the two operators below instead. Each runs
the eager step's code (bnlab.sync_steps), so it issues the same collectives and computes the
same bits; a group travels by its name (bnlab.distributed.group_name), since an operator cannot
take a ProcessGroup.

- ``bnlab::sync_batch_norm_train(x, weight?, bias?, eps, group) -> (y, stats, count)``: y, the
  float64 (4, C) rows: the group's mean, M2 and invstd, and this rank's own mean (which the
  backward sums about); and the group's 0-dim float64 count; one all_gather.
- ``bnlab::sync_batch_norm_backward(dy, x, weight?, stats, count, group, need_input,
  need_weight, bias_dtype?) -> (dx, dweight, dbias)``: its backward, with one all_reduce when
  the input gradient is wanted; 0-element tensors for gradients not wanted.

Inside a compiled graph these are opaque nodes in data order, so every rank runs them in the
same order, as the collectives require.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.backends import select_backend
from bnlab.custom_ops import (
    AVAILABLE, OVERLOAD, _grad_fakes, _strided_as_fake, call_backward, define_operators, grad_outputs,
)  # fmt: skip
from bnlab.distributed import group_name, group_named
from bnlab.stats import Moments
from bnlab.sync_steps import sync_backward, sync_forward

__all__ = ["SCHEMAS", "sync_train"]

SCHEMAS = {
    "sync_batch_norm_train": f"sync_batch_norm_train.{OVERLOAD}(Tensor x, Tensor? weight, Tensor? bias, float eps, "
    "str group) -> (Tensor, Tensor, Tensor)",
    "sync_batch_norm_backward": f"sync_batch_norm_backward.{OVERLOAD}(Tensor dy, Tensor x, Tensor? weight, "
    "Tensor stats, Tensor count, str group, bool need_input, bool need_weight, ScalarType? bias_dtype) "
    "-> (Tensor, Tensor, Tensor)",
}


def _train_impl(x, weight, bias, eps, group):
    with torch.no_grad():
        group = group_named(group)
        y, count, mean, m2, invstd, local_mean = sync_forward(x, weight, bias, eps, group, select_backend(x))
        return _strided_as_fake(y, x), torch.stack((mean, m2, invstd, local_mean)), count


def _train_fake(x, weight, bias, eps, group):
    return torch.empty_like(x), x.new_empty((4, x.shape[1]), dtype=torch.float64), x.new_empty((), dtype=torch.float64)


def _backward_impl(dy, x, weight, stats, count, group, need_input, need_weight, bias_dtype):
    with torch.no_grad():
        needs = (need_input, need_weight, bias_dtype is not None)
        dx, dw, db = sync_backward(
            dy, x, weight, stats[0], stats[2], count, stats[3], group_named(group), select_backend(x), needs,
            bias_dtype,
        )
        return grad_outputs(dx, dw, db, x)


def _backward_fake(dy, x, weight, stats, count, group, need_input, need_weight, bias_dtype):
    return _grad_fakes(dy, x, weight, stats, need_input, need_weight, bias_dtype)


#: {operator: (implementation, fake implementation)}
_IMPLEMENTATIONS = {
    "sync_batch_norm_train": (_train_impl, _train_fake),
    "sync_batch_norm_backward": (_backward_impl, _backward_fake),
}


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, group = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])  # x, weight, stats, count
    ctx.group = group
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _register():
    """Defines the two operators in the ``bnlab`` namespace; returns (library, training op)."""
    library = torch.library.Library("bnlab", "FRAGMENT")  # bnlab.custom_ops holds the namespace's DEF
    op = define_operators(library, SCHEMAS, _IMPLEMENTATIONS)
    backward_op = op["sync_batch_norm_backward"]

    def backward(ctx, dy, _dstats, _dcount):  # the statistics' gradients: none
        x, weight, stats, count = ctx.saved_tensors
        return call_backward(backward_op, ctx, dy, (x, weight, stats, count, ctx.group))

    torch.library.register_autograd(op["sync_batch_norm_train"], backward, setup_context=_setup_context, lib=library)
    return library, op["sync_batch_norm_train"]


_LIBRARY, _train_op = _register() if AVAILABLE else (None, None)


def sync_train(x: Tensor, weight, bias, eps: float, process_group) -> tuple[Tensor, Moments]:
    """SyncBatchNorm's training step through ``bnlab::sync_batch_norm_train``: y (x's shape, dtype
    and strides) and the group's Moments (count a 0-dim tensor) for the running averages. For
    validated arguments, on a group of more than one process."""
    y, stats, count = _train_op(x, weight, bias, eps, group_name(process_group))
    stats, count = stats.detach(), count.detach()  # as the eager Function marks them: no gradient
    return y, Moments(count, stats[0], stats[1])
