"""``bnlab.recalibrate``: running statistics recomputed as exact population statistics over data ("precise BN").

The running averages of BN are an exponential average of noisy batch statistics taken while
the weights were still moving; evaluation then normalizes with numbers that describe none of
the final network's activations well (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021,
arXiv:2105.07576, §3: Precise BN). ``recalibrate`` runs the model over some data with its BN
layers normalizing as in training, gathers each layer's input statistics over *all* the
batches (merged by Chan's rule, so every value counts once: batches are weighted by their
size and the spread between batch means is included), and writes

    running_mean = population mean,  running_var = population M2 / (n - 1)

(the unbiased variance, torch's convention for running_var; n is every value a channel saw).
Under torch.distributed the statistics of every rank are merged before they are written, so
every rank ends with the same, global, numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bnlab.stats import Moments, empty_moments, merge_moments, merge_stacked
from bnlab.tools.collect import check_num_batches, collect_inputs, input_moments
from bnlab.tools.freeze import is_frozen
from bnlab.tools.layers import batchnorm_layers, check_module

__all__ = ["recalibrate"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _merge_across_ranks(layers: list[tuple[str, nn.Module]], totals: dict[str, Moments]) -> dict[str, Moments]:
    """Every rank's per-layer Moments, gathered (one all_gather for all layers) and merged by Chan's rule."""
    dist = torch.distributed
    if not layers:
        return totals
    device = layers[0][1].running_mean.device
    # One flat float64 vector per rank: [count, mean (C), M2 (C)] for each layer in order.
    parts = []
    for name, _ in layers:
        stats = totals[name]
        count = torch.as_tensor(stats.count, dtype=torch.float64, device=device).reshape(1)
        parts += [count, stats.mean.to(device), stats.m2.to(device)]
    local = torch.cat(parts)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)  # (world, length)
    merged, offset = {}, 0
    for name, layer in layers:
        c = layer.num_features
        counts = stacked[:, offset]
        means = stacked[:, offset + 1 : offset + 1 + c]
        m2s = stacked[:, offset + 1 + c : offset + 1 + 2 * c]
        merged[name] = merge_stacked(counts, means, m2s)
        offset += 1 + 2 * c
    return merged


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Recompute every BN layer's running statistics as population statistics of its inputs over ``batches``.

    During the pass each BN layer normalizes with batch statistics (as in training) and updates
    nothing; every other module keeps its mode, so call ``model.eval()`` first if dropout
    should be off. Layers frozen with ``bnlab.freeze`` and layers without running statistics
    are left as they are; ``num_batches_tracked`` is not changed. A masked input
    (``layer(x, mask=m)``) contributes its selected positions only.

    With SyncBatchNorm layers under torch.distributed each forward is itself a collective, so
    every rank must then run the same number of batches (``num_batches`` helps).

    Use large batches (at least the training batch size; hundreds of samples are better): during
    the pass each BN layer normalizes with the statistics of the pass's batch, so the inputs of
    the layers after it, and the statistics written for them, depend on that batch size; large
    batches give them the inputs evaluation mode will (with batches of 2, a layer after another
    BN layer can get a visibly smaller variance than evaluation mode feeds it).

    Args:
        model: a model containing BatchNorm layers (torch.nn's, bnlab's or SyncBatchNorm).
        batches: iterable of batches: tensors, (inputs, targets, ...) tuples whose first element
            is the input, or dicts of keyword arguments; tensors are moved to the model's device.
        num_batches: use only the first ``num_batches`` batches (None: all of them).
        forward: ``forward(model, batch)`` to run a batch another way.
        progress: show a progress bar (if tqdm is importable, on rank 0 only); None: only when stderr is a terminal.

    Returns:
        ``model``, its running statistics updated in place.

    Raises:
        ValueError naming ``batches`` when there is no batch at all (outside torch.distributed;
        there, a rank without batches contributes nothing and the others' statistics are used).
    """
    check_module(model)
    num_batches = check_num_batches(num_batches)
    layers = [
        (name, layer)
        for name, layer in batchnorm_layers(model, sized=True)
        if layer.track_running_stats and layer.running_mean is not None and not is_frozen(layer)
    ]
    if not layers:  # nothing to update: say so rather than run the whole pass for nothing
        warnings.warn("recalibrate: the model has no BN layer to recalibrate (none that tracks running statistics "
                      "and is not frozen); nothing was run", stacklevel=2)
        return model
    totals = {name: empty_moments(layer.num_features, layer.running_mean.device) for name, layer in layers}

    def on_input(name, layer, x, mask):
        totals[name] = merge_moments([totals[name], input_moments(x, mask)])

    on_rank0 = not _distributed() or torch.distributed.get_rank() == 0
    seen = collect_inputs(
        model, layers, batches, num_batches, on_input, forward=forward, progress=progress if on_rank0 else False, desc="recalibrate"
    )
    if _distributed():
        # Every rank joins the collective, also one that had no batch (uneven data), or the others would wait.
        totals = _merge_across_ranks(layers, totals)
    elif seen == 0:
        raise ValueError("batches: expected at least one batch to compute population statistics from, got none")
    starved = []
    with torch.no_grad():
        for name, layer in layers:
            stats = totals[name]
            count = float(stats.count)  # one host read per layer, once per recalibration
            if count < 2:
                starved.append(name or type(layer).__name__)
                continue
            layer.running_mean.copy_(stats.mean)
            layer.running_var.copy_(stats.m2 / (count - 1))
            accumulator = layer.__dict__.get("_stats_accumulator")
            if accumulator is not None:
                accumulator.pop()  # micro-batches from before describe the old weights: drop them
    if starved:
        warnings.warn(
            f"recalibrate: layers {starved} saw fewer than 2 values per channel in the data and were left unchanged",
            stacklevel=2,
        )
    return model
