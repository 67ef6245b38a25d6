"""Finding the BatchNorm layers of a model: bnlab's, torch.nn's and SyncBatchNorm alike."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_layers", "check_module"]


def check_module(model: object) -> nn.Module:
    """model must be a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def batchnorm_layers(model: nn.Module, sized: bool = False) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, layer) for every BatchNorm1d/2d/3d or SyncBatchNorm in model, itself included.

    torch.nn's _BatchNorm is the common base of all of them (bnlab's layers subclass torch.nn's).
    A model that is itself a BN layer gets the name ``""``. With ``sized``, a lazy layer that has
    not run yet (LazyBatchNorm2d: no channel count, no tensors to read or freeze) raises a
    ValueError naming it, where torch would fail later on an uninitialized parameter.
    """
    layers = [(name, m) for name, m in check_module(model).named_modules() if isinstance(m, _BatchNorm)]
    for name, layer in layers if sized else ():
        if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
            raise ValueError(
                f"model: expected BN layers whose num_features is known, got an uninitialized "
                f"{type(layer).__name__} at {name!r}; run one batch through the model first"
            )
    return layers
