"""``bnlab.diagnose``: the one-call answer to "why is my eval accuracy bad?", layer by layer.

One pass over some data with the BN layers normalizing as in training (tools/collect.py; no
state changes). For each BN layer it compares, on the layer's actual inputs, what evaluation
mode does (running statistics) with what training mode does (batch statistics) and with fresh
population statistics, and looks for degenerate channels. Numbers and their meaning:
bnlab.tools.diagnosis.LayerDiagnosis; the advice thresholds are in that file.

The train/eval output gap needs no second forward: per channel, with batch statistics
(n, μ_B, M2, s_B = 1/sqrt(M2/n + eps)) and running ones (μ_R, s_R = 1/sqrt(var_R + eps)),

    Σ (y_train - y_eval)² = γ²·((s_B·r - s_R)²·M2 + n·(d - (μ_B - μ_R)·s_R)²),
    Σ (y_train - β)²      = γ²·(s_B²·r²·M2 + n·d²),

because Σ(x - μ_B) = 0 kills the cross term; r = 1, d = 0 for plain BN, Batch Renorm's r and d
(at the layer's current step) for a renorm layer, whose training output is
γ·((x - μ_B)·s_B·r + d) + β. "Batch" means what the layer normalizes over in training: for a
Ghost BN layer each ghost batch of ``virtual_batch_size`` samples is a batch of its own (for the
gap and the batch noise; the population statistics are those of all the data either way).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from bnlab.stats import empty_moments, merge_moments
from bnlab.tools.collect import check_num_batches, collect_inputs, input_moments
from bnlab.tools.diagnosis import NEAR_ZERO_VAR, Diagnosis, LayerDiagnosis, advise
from bnlab.tools.freeze import is_frozen
from bnlab.tools.layers import batchnorm_layers, check_module
from bnlab.variants.renorm import renorm_correction, renorm_limits

__all__ = ["diagnose"]


class _LayerProbe:
    """Running sums for one layer over the batches of the pass (float64 tensors on the layer's device)."""

    def __init__(self, layer: nn.Module) -> None:
        device = layer.weight.device if layer.weight is not None else None
        if layer.running_mean is not None:
            device = layer.running_mean.device
        self.total = empty_moments(layer.num_features, device or torch.device("cpu"))
        self.batch_means: list[torch.Tensor] = []
        self.gap_num = torch.zeros((), dtype=torch.float64, device=self.total.mean.device)
        self.gap_den = torch.zeros_like(self.gap_num)

    def add(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        k = getattr(layer, "virtual_batch_size", None)
        if k is not None and mask is None and x.shape[0] > k:
            for chunk in x.split(k):  # the ghost batches training normalizes over (consecutive, the last smaller)
                self._add_batch(layer, chunk, None)
        else:
            self._add_batch(layer, x, mask)

    def _add_batch(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        stats = input_moments(x, mask)
        self.total = merge_moments([self.total, stats])
        self.batch_means.append(stats.mean)
        if layer.running_mean is None:
            return
        n = torch.as_tensor(stats.count, dtype=torch.float64, device=stats.mean.device)
        eps = float(layer.eps)
        gamma2 = layer.weight.detach().to(torch.float64).square() if layer.weight is not None else 1.0
        s_b = torch.rsqrt(stats.m2 / torch.clamp(n, min=1.0) + eps)
        s_r = torch.rsqrt(layer.running_var.detach().to(torch.float64) + eps)
        delta = stats.mean - layer.running_mean.detach().to(torch.float64)
        r, d = 1.0, 0.0
        if getattr(layer, "renorm", False):  # training output γ·((x - μ_B)·s_B·r + d) + β
            rmax, dmax = renorm_limits(layer.num_batches_tracked, layer.rmax, layer.dmax, layer.renorm_ramp)
            r, d = renorm_correction(stats.mean, s_b, layer.running_mean, layer.running_var, eps, rmax, dmax)
        self.gap_num += (gamma2 * ((s_b * r - s_r).square() * stats.m2 + n * (d - delta * s_r).square())).sum()
        self.gap_den += (gamma2 * (s_b.square() * r**2 * stats.m2 + n * d**2)).sum()

    def result(self, name: str, layer: nn.Module) -> LayerDiagnosis:
        eps = float(layer.eps)
        count = float(self.total.count)
        mean = self.total.mean.cpu().numpy()
        var = (self.total.m2 / (count - 1)).cpu().numpy() if count > 1 else np.full_like(mean, np.nan)
        scale = np.sqrt(var + eps)
        if self.batch_means:
            scatter = torch.stack(self.batch_means).cpu().numpy() - mean  # (batches, C)
            noise = np.sqrt(np.mean(scatter**2, axis=0)) / scale
        else:
            noise = np.full_like(mean, np.nan)
        if layer.running_mean is not None:
            running_mean = layer.running_mean.detach().double().cpu().numpy()
            running_var = layer.running_var.detach().double().cpu().numpy()
            shift = np.abs(running_mean - mean) / scale
            ratio = (running_var + eps) / (var + eps)
            den = float(self.gap_den)
            gap = float(np.sqrt(float(self.gap_num) / den)) if den > 0 else float("nan")
            if is_frozen(layer):  # it trains with its running statistics (bnlab.freeze): no gap
                gap = 0.0
        else:  # no running statistics: evaluation mode uses batch statistics too
            shift = ratio = np.full_like(mean, np.nan)
            gap = float("nan")
        near_zero = [int(c) for c in np.flatnonzero(var < NEAR_ZERO_VAR * eps)]
        eps_dominated = [int(c) for c in np.flatnonzero((var >= NEAR_ZERO_VAR * eps) & (var < eps))]
        d = LayerDiagnosis(
            name=name,
            kind=type(layer).__name__,
            channels=int(layer.num_features),
            samples=int(round(count)),
            output_gap=gap,
            mean_shift=shift,
            var_ratio=ratio,
            batch_noise=noise,
            population_mean=mean,
            population_var=var,
            near_zero_var=near_zero,
            eps_dominated=eps_dominated,
            frozen=is_frozen(layer),
        )
        d.advice = advise(d)
        return d


def diagnose(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    show: bool = True,
    progress: bool | None = None,
) -> Diagnosis:
    """Report, per BN layer, the train/eval output gap, stale running statistics and degenerate channels.

    Nothing in the model changes: BN layers normalize with batch statistics during the pass
    but update nothing, other modules keep their mode. Statistics are this process's only
    (no cross-rank reduction). The gap and the batch noise describe batches of the size given
    (pass the training batch size to see what training does); the population statistics behind
    the mean shift and var ratio are taken, as :func:`bnlab.recalibrate` takes them, with every
    BN layer normalizing by the pass's batches, so judge staleness with large batches.

    Args:
        model: a model containing BatchNorm layers (torch.nn's, bnlab's or SyncBatchNorm).
        batches: iterable of batches, as for :func:`bnlab.recalibrate`.
        num_batches: use only the first ``num_batches`` batches (None: all).
        forward: ``forward(model, batch)`` to run a batch another way.
        show: print the table to stdout.
        progress: show a progress bar (if tqdm is importable); None: only when stderr is a terminal.

    Returns:
        A :class:`~bnlab.tools.diagnosis.Diagnosis`: ``.layers`` (one LayerDiagnosis each, in
        model order), ``["name"]`` for one layer, ``.to_dict()`` for JSON, ``str()`` for the table.
    """
    check_module(model)
    num_batches = check_num_batches(num_batches)
    layers = batchnorm_layers(model, sized=True)
    probes = {name: _LayerProbe(layer) for name, layer in layers}

    def on_input(name, layer, x, mask):
        probes[name].add(layer, x, mask)

    seen = collect_inputs(model, layers, batches, num_batches, on_input, forward=forward, progress=progress, desc="diagnose")
    if seen == 0:
        raise ValueError("batches: expected at least one batch to diagnose the model on, got none")
    result = Diagnosis([probes[name].result(name, layer) for name, layer in layers], batches=seen)
    if show:
        print(result.table(), file=sys.stdout)
    return result
