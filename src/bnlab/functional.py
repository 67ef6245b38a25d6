"""``bnlab.functional.batch_norm``: torch.nn.functional.batch_norm's signature, bnlab's implementation.

The computation is bnlab's own (a reduce phase, then an elementwise phase, with a hand-derived
backward: bnlab.autograd); nothing here calls torch.batch_norm or ATen's native BN ops, except
in evaluation mode under ``torch.jit.trace``, where the traced graph gets the operator other
runtimes know (bnlab.composite says why a trace cannot record bnlab's kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import _checks, composite, custom_ops
from bnlab.autograd import BatchNormEvalFunction, BatchNormTrainFunction, eval_statistics
from bnlab.backends.autograd_apply import direct_apply
from bnlab.backends import select_backend
from bnlab.stats import Moments, update_running_stats_

__all__ = ["batch_norm"]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization over channel dim 1, as ``torch.nn.functional.batch_norm``.

    In training mode each channel is normalized with the mean and biased variance of the batch
    over every dim but dim 1, and, when ``running_mean``/``running_var`` are given, they are
    updated in place: ``running = (1 - momentum)·running + momentum·batch`` with the unbiased
    batch variance, unless the batch's mean or variance is not finite: then they stay as they were
    (bnlab's non-finite guard, docs/features.md; torch.nn.functional.batch_norm lets NaN in). In
    evaluation mode (``training=False``) the running statistics are used.
    Then ``y = (x - mean) / sqrt(var + eps) · weight + bias``. Math: docs/math.md.

    Args:
        input: (N, C, *) floating tensor; fp16/bf16 are computed with fp32 statistics.
        running_mean, running_var: (C,) buffers, or None (then training must be True).
        weight, bias: (C,) affine parameters, or None for 1 and 0.
        training: use (and update) batch statistics rather than the running ones.
        momentum: weight of the new batch in the running averages (PyTorch's convention; Keras's
            momentum=0.99 is 0.01 here, see bnlab.reference.decay_to_momentum).
        eps: added to the variance; must be > 0 in training, >= 0 in evaluation.

    Returns:
        Tensor of input's shape, dtype and memory format.

    Raises:
        TypeError / ValueError naming the argument for non-tensors, integer or complex input,
        rank < 2, (C,) vectors of the wrong size, one value per channel in training, bad eps or
        momentum, missing running statistics in evaluation, and negative running_var.
    """
    x = _checks.check_input(input)
    channels = x.shape[1]
    for name, vec in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _checks.check_channel_vector(vec, name, channels, x)
    # Traced by torch.compile / torch.export: each call one node of the graph (bnlab.custom_ops).
    compiling = custom_ops.tracing(x) and not composite.transforms_active()

    if training:
        _checks.check_training_batch(x)
        eps = _checks.check_eps(eps)
        if (running_mean is None) != (running_var is None):
            raise ValueError(
                "running_mean, running_var: expected both tensors or both None, got "
                f"running_mean={'None' if running_mean is None else 'a tensor'}, "
                f"running_var={'None' if running_var is None else 'a tensor'}"
            )
        factor = 0.0
        if running_mean is not None:
            factor = _checks.check_momentum(momentum)
            if factor is None:
                raise TypeError("momentum: expected a float (the module turns momentum=None into 1/num_batches), got None")
        if compiling:
            return custom_ops.train(x, weight, bias, eps, running_mean, running_var, None, factor, True)
        if composite.transforms_active():  # forward-mode AD or torch.func: differentiable torch ops
            y, mean, m2 = composite.train_forward(x, weight, bias, eps)
        else:
            backend = select_backend(x)
            # the guard, as on every other path here (update_running_stats_ below, custom_ops.train)
            y = backend.train_forward(x, weight, bias, eps, running_mean, running_var, factor, skip_nonfinite=True)
            if y is not None:  # the backend fused the step, running averages included
                return y
            y, mean, m2 = BatchNormTrainFunction.apply(x, weight, bias, eps, backend)
        if running_mean is not None:
            update_running_stats_(running_mean, running_var, Moments(_checks.values_per_channel(x), mean, m2), factor)
        return y

    eps = _checks.check_eps(eps, allow_zero=True)
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean, running_var: expected (C,) tensors in evaluation mode (training=False), got None; "
            "pass training=True to normalize with batch statistics"
        )
    if compiling:
        return custom_ops.evaluate(x, running_mean, running_var, weight, bias, eps)
    if composite.jit_tracing():  # a traced model for TorchScript or ONNX: their BatchNormalization
        _checks.check_running_var_nonnegative(running_var)
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if composite.transforms_active():
        _checks.check_running_var_nonnegative(running_var)
        return composite.eval_forward(x, running_mean, running_var, weight, bias, eps)
    backend = select_backend(x)
    if not (torch.is_grad_enabled() and _any_requires_grad(x, weight, bias)):
        # No graph to record (inference): the backend may normalize straight from the buffers.
        y = backend.eval_forward(x, running_mean, running_var, weight, bias, eps)
        if y is not None:
            return y
    return eval_with_graph(x, running_mean, running_var, weight, bias, eps, backend)


def eval_with_graph(x, running_mean, running_var, weight, bias, eps: float, backend) -> Tensor:
    """Evaluation-mode BN recorded for autograd (fixed statistics; gradients for x, weight, bias).

    For callers that validated the arguments already (batch_norm above, the modules' fast path):
    (N, C, *) x, (C,) floating vectors on x's device, running statistics present, eps >= 0.
    Raises for a negative running variance, naming the channels.
    """
    return _apply_eval(x, weight, bias, *eval_statistics(running_mean, running_var, eps, backend), backend)


#: BatchNormEvalFunction.apply without torch's Python wrapper where it is idle (backends.autograd_apply).
_apply_eval = direct_apply(BatchNormEvalFunction)


def _any_requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)
