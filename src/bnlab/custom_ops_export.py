"""The eval operator in ATen's own terms, for exporters that lower a graph to a fixed operator set.

``torch.onnx.export`` (``dynamo=True``, its default: torch.export underneath) translates each node
of the exported program into ONNX. It has no translation for ``bnlab::batch_norm_eval`` and so
stopped with a ConversionError on any model with a bnlab layer. Before translating, it decomposes
every operator it cannot translate through the decompositions registered with ``torch._decomp``.
Registered there, the eval operator becomes ATen's own eval-mode BN
(``aten._native_batch_norm_legit_no_training``), which ONNX writes as BatchNormalization and
folds into a convolution before it. The same decomposition serves anyone who lowers a program
with that table (``exported.run_decompositions(torch._decomp.decomposition_table)``, e.g. for an
edge runtime's core-ATen operator set).

torch.compile does not use it: inductor decomposes from its own list, so a compiled layer stays
one node running bnlab's kernels, with their bits (tests/test_compile.py). A decomposed graph
computes torch's eval-mode BN, equal to bnlab's within float32 rounding; the negative-variance
check, which reads values, is not part of it.

The training operators have no decomposition (their statistics and buffer updates are bnlab's,
and ONNX's training-mode BatchNormalization is not what a deployed model runs): export a model
for inference in eval mode. A layer with ``track_running_stats=False`` runs the training operator
in eval mode too, so ``dynamo=True`` stops there (``dynamo=False`` exports it). A decomposition of
that operator without statistics, tried in the forty-eighth session, could not be registered:
in torch._decomp's table FakeTensorMode takes it for every call of the operator, and one that
declines (NotImplemented, for the calls with running statistics) broke torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["register_eval_decomposition"]


def _eval_in_aten(x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float):
    """``bnlab::batch_norm_eval``'s outputs, (y, stats), from ATen operators: y from ATen's eval
    BN; stats (2, C) float64 rows mean, invstd (read only by the backward, so absent from an
    inference program once unused nodes are dropped)."""
    y = torch.ops.aten._native_batch_norm_legit_no_training.default(x, weight, bias, running_mean, running_var, 0.0, eps)[0]
    mean = running_mean.to(torch.float64)
    return y, torch.stack((mean, torch.rsqrt(running_var.to(torch.float64) + eps)))


def register_eval_decomposition(eval_op) -> None:
    """Registers :func:`_eval_in_aten` as ``eval_op``'s decomposition in torch._decomp's table."""
    from torch._decomp import register_decomposition

    register_decomposition(eval_op)(_eval_in_aten)
