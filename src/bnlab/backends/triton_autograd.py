"""The Triton backend's training step as one autograd Function (see cpu_autograd for the CPU twin).

Forward: statistics, running averages (and the batch counter) and output in three kernel
launches, one for small rows of channels (triton_ops); the Function saves x, the (3, C) float64
statistics and the float32 coefficients. Backward: dx, dweight and dbias in their final dtypes
in two launches for most NCHW inputs (triton_ops.merge_in_tiles), else three (one for small rows
of channels).
"""

from __future__ import annotations

import torch

from bnlab.backends.autograd_apply import direct_apply
from bnlab.backends.triton_backend import _like


class TritonTrainFunction(torch.autograd.Function):
    """y = BN(x) with batch statistics; config = (eps, backend, running_mean, running_var, momentum,
    num_batches_tracked, skip_nonfinite, plan), as TritonBackend.train_forward passes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        eps, backend, running_mean, running_var, momentum, counter, guard, p = config
        y, stats, coef, _ = backend.ops().forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, p=p
        )
        ctx.save_for_backward(x, weight, stats, coef)
        ctx.config = (eps, backend, None if bias is None else bias.dtype, p)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats, coef = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        eps, backend, bias_dtype, p = ctx.config
        if torch.is_grad_enabled():
            # create_graph=True: the same closed form in differentiable torch ops (bnlab.autograd).
            from bnlab.autograd import differentiable_train_grads

            return *differentiable_train_grads(dy, x, weight, eps, bias_dtype, (need_x, need_w, need_b)), None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty(p.c, dtype=bias_dtype, device=x.device) if need_b else None
        dx, _, _ = backend.ops().backward(_like(dy, x), x, stats, coef[0], weight, need_x, dweight=dw, dbias=db, p=p,
                                          centred=True)  # the forward's own batch mean
        return dx, dw, db, None


#: TritonTrainFunction.apply(x, weight, bias, config), without torch's Python wrapper where it is idle.
apply_train = direct_apply(TritonTrainFunction)
