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


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, layer) for every BatchNorm1d/2d/3d or SyncBatchNorm in model, itself included.

    torch.nn's _BatchNorm is the common base of all of them (bnlab's layers subclass torch.nn's).
    A model that is itself a BN layer gets the name ``""``.
    """
    return [(name, m) for name, m in check_module(model).named_modules() if isinstance(m, _BatchNorm)]
