"""One pass of a model over data with its BN layers in batch-statistics mode: shared by recalibrate and diagnose.

During the pass the chosen BN layers normalize with batch statistics, as in training, but
update nothing (``track_running_stats`` is switched off for the pass, which is exactly how
torch.nn and bnlab layers are told not to touch their buffers or ``num_batches_tracked``);
every other module keeps its mode (dropout stays off if the model was in eval mode). A
forward pre-hook hands each BN layer's input to a callback. Everything is restored afterwards,
also when the pass raises.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import itertools
import numbers
import sys
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from bnlab._checks import check_input_channels
from bnlab.stats import Moments
from bnlab.backends import select_backend
from bnlab.variants.masked import masked_moments

__all__ = ["check_num_batches", "run_batch", "check_layer_input", "input_moments", "collect_inputs"]

#: on_input(name, layer, x, mask) is called with each BN layer's input during the pass.
OnInput = Callable[[str, nn.Module, Tensor, "Tensor | None"], None]


def check_num_batches(num_batches: object) -> int | None:
    """None (all batches) or a positive int."""
    if num_batches is None:
        return None
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1:
        raise ValueError(f"num_batches: expected None (every batch) or a positive int, got {num_batches!r}")
    return int(num_batches)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to(value: Any, device: torch.device | None) -> Any:
    return value.to(device) if isinstance(value, Tensor) and device is not None else value


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call the model on one batch as torch.optim.swa_utils.update_bn does, moving tensors to its device.

    A tensor is the input; of a tuple or list (inputs, targets, ...) the first element is; a
    dict is passed as keyword arguments.
    """
    device = _model_device(model)
    if isinstance(batch, dict):
        return model(**{k: _to(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batches: expected each batch to be a tensor, a non-empty tuple/list or a dict, got ()")
        batch = batch[0]
    return model(_to(batch, device))


@functools.lru_cache(maxsize=None)
def _takes_mask(layer_type: type) -> bool:
    """Whether the layer's forward has a ``mask`` argument (bnlab.BatchNorm*d's masked BN)."""
    return "mask" in inspect.signature(layer_type.forward).parameters


def call_mask(layer: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The ``mask`` of a call of a BN layer: its second positional argument or ``mask=`` where its
    forward takes one (bnlab.BatchNorm*d), else None: BatchNormAct2d's second argument is the
    residual, which is added after BN and leaves its statistics alone."""
    if not _takes_mask(type(layer)):
        return None
    return args[1] if len(args) > 1 else kwargs.get("mask")


def check_layer_input(name: str, layer: nn.Module, x: object) -> None:
    """The layer's own input checks (rank, channel count), made before the pass reads the input's
    statistics, with the layer named: the statistics came first, and a wrong input failed inside
    them (torch.stack of unequal sizes, an IndexError) instead of with the layer's message."""
    where = f"batches: at BN layer {name!r}" if name else "batches: at the BN layer"
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a tensor input, got {type(x).__name__}")
    try:
        if hasattr(layer, "_check_input_dim"):  # torch.nn's and bnlab's rank check
            layer._check_input_dim(x)
        if x.dim() < 2:
            raise ValueError(f"input: expected (N, C, *) input, got {x.dim()}D input of shape {tuple(x.shape)}")
        check_input_channels(x, layer.num_features)  # (the layers' own message; torch.nn's has none)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def input_moments(x: Tensor, mask: Tensor | None) -> Moments:
    """Per-channel Moments of a BN layer's input (over the masked positions when a mask is given)."""
    with torch.no_grad():
        return masked_moments(x, mask) if mask is not None else select_backend(x).moments(x)


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool | None) -> Iterable:
    """A tqdm progress bar when tqdm is importable (it is not a core dependency) and it is wanted:
    ``enabled=True`` always, ``None`` only when stderr (where tqdm writes) is a terminal, so logs,
    pipes and tests stay free of bars."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _total(batches: Iterable, num_batches: int | None) -> int | None:
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)


def collect_inputs(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    batches: Iterable,
    num_batches: int | None,
    on_input: OnInput,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool | None = None,
    desc: str = "bnlab",
) -> int:
    """Run ``model`` over ``batches`` with ``layers`` in batch-statistics mode; feed their inputs to ``on_input``.

    Args:
        model: the model to run.
        layers: (name, BN layer) pairs to switch and watch.
        batches: an iterable of batches (a DataLoader, a list of tensors, ...).
        num_batches: stop after this many batches (None: all).
        on_input: ``on_input(name, layer, x, mask)`` for each watched layer's input.
        forward: ``forward(model, batch)`` runs one batch; default :func:`run_batch`.
        progress: show a tqdm bar (if tqdm is importable); None: only when stderr is a terminal.
        desc: the bar's label.

    Returns:
        The number of batches run.
    """
    if forward is not None and not callable(forward):
        raise TypeError(f"forward: expected None or a callable forward(model, batch), got {type(forward).__name__} "
                        f"{forward!r}")
    if not isinstance(batches, collections.abc.Iterable):
        raise TypeError(f"batches: expected an iterable of batches (a DataLoader, a list of tensors), got "
                        f"{type(batches).__name__}")
    for name, layer in layers:  # before the pass: a meta layer had failed after it, on reading its count
        if any(t is not None and t.is_meta for t in (layer.running_mean, layer.weight)):
            raise ValueError(f"model: BN layer {name or type(layer).__name__!r} is on the meta device (no values to "
                             "compute with); materialize or load the model's tensors first")
    forward = forward or run_batch
    saved = [(layer, layer.training, layer.track_running_stats) for _, layer in layers]
    handles = []
    for name, layer in layers:

        def hook(module, args, kwargs, name=name):
            x = args[0] if args else kwargs.get("input")
            check_layer_input(name, module, x)
            on_input(name, module, x, call_mask(module, args, kwargs))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    count = 0
    try:
        for layer, _, _ in saved:
            layer.training = True  # the attribute, not .train(): no children to touch, nothing else
            layer.track_running_stats = False
        chosen = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad():
            for batch in _progress(chosen, _total(batches, num_batches), desc, progress):
                forward(model, batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for layer, training, tracking in saved:
            layer.training = training
            layer.track_running_stats = tracking
    return count
