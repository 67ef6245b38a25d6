"""``bnlab.convert``: swap torch.nn BatchNorm layers for bnlab's inside an existing model, and back.

The new layer takes over the old one's Parameter objects and buffers (no copy), so an optimizer
built before the conversion keeps updating the same tensors, and nothing about the model's
state changes: only which code computes BN.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn

from bnlab.lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from bnlab.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.tools.freeze import carry_freeze
from bnlab.variants.options import FEATURE_DEFAULTS

__all__ = ["convert", "rebuild_batchnorm"]

_TORCH_TO_BNLAB = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    # Lazy layers not yet called: left as they are, they would turn into torch.nn's at the first call.
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
# bnlab's options that change what a training step computes (docs/features.md); torch.nn has none.
# (skip_nonfinite, on by default, only matters for a batch torch.nn would let poison its statistics.)
_TRAINING_OPTIONS = ("virtual_batch_size", "renorm", "accumulation_steps")
_TARGETS = ("bnlab", "torch")


@functools.cache
def _mapping(to: str) -> dict:
    """{old type: new type} for ``to``: the table above and the SyncBatchNorm pair, both ways.

    Completed at the first call: bnlab.sync imports this module (rebuild_batchnorm).
    """
    from bnlab.sync import SyncBatchNorm

    to_bnlab = {**_TORCH_TO_BNLAB, nn.SyncBatchNorm: SyncBatchNorm}
    return to_bnlab if to == "bnlab" else {new: old for old, new in to_bnlab.items()}


def rebuild_batchnorm(old: nn.Module, new_type: type, **extra) -> nn.Module:
    """A layer of ``new_type`` with old's configuration and mode, holding old's parameters and buffers.

    The Parameter and buffer objects are shared, not copied. ``extra`` goes to ``new_type``'s
    constructor (e.g. ``process_group`` for SyncBatchNorm). A lazy ``new_type`` (LazyBatchNorm2d)
    takes no num_features: it gets old's, 0 until old was sized, with old's uninitialized tensors.
    """
    lazy = issubclass(new_type, nn.modules.lazy.LazyModuleMixin)
    new = new_type(
        *(() if lazy else (old.num_features,)),
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",  # placeholders only: old's tensors replace them below
        bias=old.bias is not None or not old.affine,
        **extra,
    )
    for name in ("weight", "bias"):
        new.register_parameter(name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(old, name))
    if lazy:
        new.num_features = old.num_features
    new.train(old.training)
    carry_freeze(old, new)
    return new


def convert(module: nn.Module, to: str = "bnlab") -> nn.Module:
    """Replace every BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d and SyncBatchNorm in ``module`` with the other
    implementation, keeping its state.

    ``convert(model)`` swaps torch.nn's layers for bnlab's; ``convert(model, to="torch")`` swaps
    bnlab's back. torch.nn.SyncBatchNorm and bnlab.SyncBatchNorm are swapped too, keeping their
    process group (bnlab's also trains on CPU, over gloo). Layers are matched by exact type, so
    subclasses are left alone (bnlab.SyncBatchNorm.convert_sync_batchnorm makes every BN layer a
    synchronised one). Parameters and buffers are shared, not copied; forward hooks registered on
    a replaced layer are not carried over, but for ``bnlab.freeze``'s: a frozen layer's
    replacement is frozen.
    torch.nn's layers have none of bnlab's options (docs/features.md): converting a layer with
    Ghost BN, Batch Renormalization or accumulated statistics to torch warns that they are dropped.

    Args:
        module: a model, or a single BN layer.
        to: ``"bnlab"`` or ``"torch"``.

    Returns:
        The converted module: ``module`` itself, changed in place, unless ``module`` is a BN layer,
        in which case its replacement.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if to not in _TARGETS:
        raise ValueError(f"to: expected 'bnlab' or 'torch', got {to!r}")
    return _convert_tree(module, to, "")


def _library_name(layer_type: type) -> str:
    """'bnlab.BatchNorm2d' or 'torch.nn.BatchNorm2d': the two libraries' classes share their names."""
    return ("bnlab." if layer_type.__module__.startswith("bnlab") else "torch.nn.") + layer_type.__name__


def _convert_tree(module: nn.Module, to: str, path: str) -> nn.Module:
    """convert's walk (replace_layers): ``path`` is module's name in the model (its qualified name;
    "" at the top), which an error of a layer's conversion names (bnlab refuses some configurations
    torch.nn takes, such as eps=0)."""

    def replacement(layer: nn.Module, where: str) -> nn.Module | None:
        new_type = _mapping(to).get(type(layer))
        if new_type is None:
            return None
        if to == "torch":
            warn_of_dropped_options(layer, "convert", f"torch.nn.{new_type.__name__}", _TRAINING_OPTIONS)
        extra = {"process_group": layer.process_group} if hasattr(layer, "process_group") else {}
        try:
            return rebuild_batchnorm(layer, new_type, **extra)
        except ValueError as err:
            named = f"layer {where!r}" if where else "the layer"
            raise ValueError(f"module: {named}, a {_library_name(type(layer))}, cannot become a "
                             f"{_library_name(new_type)}: {err}") from None

    return replace_layers(module, replacement, path)


def replace_layers(module: nn.Module, replacement, path: str = "") -> nn.Module:
    """``module`` with each module for which ``replacement(module, qualified name)`` gives a new one
    put in its place (convert, SyncBatchNorm.convert_sync_batchnorm); returns module's own
    replacement, or module. A module held in two places becomes one replacement held in both: the
    walk keeps what it replaced by id, and reads every name a child is held under, where
    named_children() gives a module held twice once only (the second place had kept the old layer
    beside its replacement sharing its buffers, and recalibrate then wrote the statistics of one use
    over the other's). A replaced module's children, converted too, go to its replacement."""
    done: dict[int, nn.Module] = {}

    def walk(current: nn.Module, where: str) -> nn.Module:
        if id(current) in done:
            return done[id(current)]
        result = done[id(current)] = replacement(current, where) or current
        for name, child in list(current._modules.items()):
            if child is not None:
                converted = walk(child, f"{where}.{name}" if where else name)
                if converted is not child or result is not current:
                    setattr(result, name, converted)
        return result

    return walk(module, path)


def warn_of_dropped_options(old: nn.Module, caller: str, becomes: str, options: tuple[str, ...]) -> None:
    """A UserWarning from ``caller`` where ``old`` has any of ``options`` (feature options of
    docs/features.md) set, which the layer it ``becomes`` does not have."""
    dropped = [f"{n}={getattr(old, n)!r}" for n in options if getattr(old, n, FEATURE_DEFAULTS[n]) != FEATURE_DEFAULTS[n]]
    if dropped:
        warnings.warn(
            f"{caller}: {type(old).__name__}({old.num_features}) with {', '.join(dropped)} becomes "
            f"{becomes}, which has no such option: in training it normalizes each batch as plain BN",
            UserWarning,
            stacklevel=3,
        )
