"""The training step of the CPU backend as one lean autograd Function.

bnlab.autograd.BatchNormTrainFunction returns the batch statistics and lets the caller update the
running averages: general, but on a (256, 100) input its bookkeeping costs more than the kernel.
Here one kernel call computes the statistics, the output and the running averages, one more
computes dx, dweight and dbias in their final dtypes, and the Function saves a single (3, C)
statistics tensor. The math and the results are those of the general path (docs/math.md §3).
"""

from __future__ import annotations

import torch

from bnlab.autograd import eval_grads
from bnlab.backends.autograd_apply import c_apply, direct_apply


class CpuTrainFunction(torch.autograd.Function):
    """y = BN(x) with the batch's statistics, updating running_mean/running_var in the same call.

    forward(x, weight, bias, config) -> y with config = (eps, backend, running_mean, running_var,
    momentum, num_batches_tracked, skip_nonfinite), as for CpuBackend.forward_stats. (One tuple
    rather than seven arguments: each argument costs autograd time per call.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        eps, backend, running_mean, running_var, momentum, nbt, guard = config
        y, stats, plan = backend.forward_stats(x, weight, bias, eps, running_mean, running_var, momentum, nbt, guard)
        ctx.save_for_backward(x, weight, stats)
        ctx.config = (eps, backend, None if bias is None else bias.dtype, plan)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        eps, backend, bias_dtype, plan = ctx.config
        if torch.is_grad_enabled():
            # create_graph=True: the same closed form in differentiable torch ops (bnlab.autograd).
            from bnlab.autograd import differentiable_train_grads

            return *differentiable_train_grads(dy, x, weight, eps, bias_dtype, (need_x, need_w, need_b)), None
        grads = backend.backward_entry(dy, x, stats, weight, plan, ctx.needs_input_grad, bias_dtype)
        if grads is not None:
            return grads  # (dx, dweight, dbias, None) from one compiled call
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty(plan[2], dtype=bias_dtype) if need_b else None
        return backend.backward_fused(dy, x, stats, weight, plan, need_x, dw, db), dw, db, None


#: CpuTrainFunction.apply(x, weight, bias, config), without torch's Python wrapper where it is idle.
apply_train = direct_apply(CpuTrainFunction)


class CpuTrainFromKernel(CpuTrainFunction):
    """CpuTrainFunction after its kernel call: the compiled training call (``bn_train_module``,
    cpu_kernels_py_train.inc) has run the forward kernel and hands over its results.

    forward(x, weight, bias, done) -> y with done = (y, (3, C) statistics, ctx.config as
    CpuTrainFunction keeps it); only saves what the shared backward reads.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, done):
        y, stats, ctx.config = done
        ctx.save_for_backward(x, weight, stats)
        return y


class CpuEvalFromKernel(torch.autograd.Function):
    """The eval-mode map (autograd.BatchNormEvalFunction's) after its kernel call: the compiled eval
    call (``bn_eval_module``) computed y from the running statistics and hands it over when a graph
    is wanted.

    forward(x, weight, bias, done) -> y with done = (y, (2, C) float64 rows mean and invstd,
    ctx.config) and config = (backend, bias dtype, plan), plan = (layout, N, C, L, dtype code,
    threads) as for CpuTrainFunction. One statistics tensor and one ctx attribute: each costs
    autograd time per call. The first-order backward is one compiled call
    (``bn_eval_backward_module``); where it declines, and under create_graph, the gradients are
    BatchNormEvalFunction's (autograd.eval_grads).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, done):
        y, stats, ctx.config = done
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        backend, bias_dtype, plan = ctx.config
        needs = ctx.needs_input_grad
        if not torch.is_grad_enabled():
            grads = backend.eval_backward_entry(dy, x, stats, weight, plan, needs, bias_dtype)
            if grads is not None:
                return grads  # (dx, dweight, dbias, None) from one compiled call
        mean, invstd = stats.unbind()
        return *eval_grads(dy, x, weight, mean, invstd, needs[:3], bias_dtype, backend), None


#: The two Functions' apply in C, which the compiled calls (bn_train_module, bn_eval_module) use
#: outside transforms and tracing only (they decline those).
kernel_done_apply = c_apply(CpuTrainFromKernel)
eval_done_apply = c_apply(CpuEvalFromKernel)
