"""``bnlab.freeze`` / ``bnlab.unfreeze``: BN layers that stay in inference mode while the rest trains.

``model.train()`` switches every BN layer back to batch statistics and running-average
updates, which is why a frozen backbone (fine-tuning with small batches, detection models)
keeps drifting in PyTorch. A frozen layer here behaves like Keras's ``trainable=False`` BN:
every forward normalizes with the running statistics and updates nothing, whatever
``model.train()`` said; with ``affine=True`` γ and β stop receiving gradients too.

How: a forward pre-hook puts the layer in eval mode for the duration of its forward, and a
forward hook (always called, even when the forward raises) puts back the mode it had, so
``layer.training`` keeps reporting the model's mode. Works for torch.nn's layers as well as
bnlab's. Freezing is not saved in the state dict: it is a decision of the training script.
"""

from __future__ import annotations

from torch import nn

from bnlab.tools.layers import batchnorm_layers

__all__ = ["freeze", "unfreeze", "is_frozen", "carry_freeze"]

_STATE = "_bnlab_frozen"  # attribute on a frozen layer: its hook handles and parameters' requires_grad


def _enter_eval(module: nn.Module, args) -> None:
    module.__dict__["_bnlab_mode_outside_forward"] = module.training
    module.training = False


def _restore_mode(module: nn.Module, args, output) -> None:
    module.training = module.__dict__.pop("_bnlab_mode_outside_forward", module.training)


#: the hooks freeze registers: they switch the layer's mode for its forward and change nothing else
MODE_HOOKS = (_enter_eval, _restore_mode)


def _mode_hooks(layer: nn.Module) -> list:
    """The two hooks that hold a frozen layer in eval mode during its forward; their handles."""
    return [layer.register_forward_pre_hook(_enter_eval), layer.register_forward_hook(_restore_mode, always_call=True)]


def is_frozen(layer: nn.Module) -> bool:
    """Whether ``bnlab.freeze`` froze this layer (and no ``unfreeze`` undid it)."""
    return getattr(layer, _STATE, None) is not None


def freeze(model: nn.Module, affine: bool = True) -> nn.Module:
    """Freeze every BN layer in ``model``: running statistics used and kept, even under ``model.train()``.

    Args:
        model: a model, a sub-model (``freeze(model.backbone)``) or a single BN layer.
        affine: also stop γ and β from training (``requires_grad = False``), as Keras's
            ``trainable=False`` does. With ``affine=False`` only the statistics are frozen.

    Returns:
        ``model``, changed in place. Freezing a frozen layer again only updates ``affine``.
    """
    if not isinstance(affine, bool):
        raise TypeError(f"affine: expected a bool, got {type(affine).__name__} {affine!r}")
    for _, layer in batchnorm_layers(model, sized=True):
        state = getattr(layer, _STATE, None)
        if state is None:
            handles = _mode_hooks(layer)
            params = {name: p.requires_grad for name, p in layer.named_parameters(recurse=False)}
            state = {"handles": handles, "requires_grad": params}
            layer.__dict__[_STATE] = state
        for name, p in layer.named_parameters(recurse=False):
            p.requires_grad_(state["requires_grad"][name] and not affine)
    return model


def carry_freeze(old: nn.Module, new: nn.Module) -> None:
    """Freeze ``new``, the layer that replaces ``old`` (bnlab.convert, convert_sync_batchnorm), as
    ``old`` was, where it was: they share their parameters, whose requires_grad freeze already
    set; the hooks are the new layer's own, and unfreeze restores what ``old`` had before. (The
    freeze had been lost in a conversion, the statistics updating again under model.train().)"""
    state = getattr(old, _STATE, None)
    if state is None:
        return
    new.__dict__[_STATE] = {"handles": _mode_hooks(new), "requires_grad": dict(state["requires_grad"])}


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` for every BN layer in ``model``: hooks removed, γ/β's ``requires_grad`` restored.

    Returns:
        ``model``, changed in place. Layers that are not frozen are left alone.
    """
    for _, layer in batchnorm_layers(model):
        state = layer.__dict__.pop(_STATE, None)
        if state is None:
            continue
        for handle in state["handles"]:
            handle.remove()
        for name, p in layer.named_parameters(recurse=False):
            p.requires_grad_(state["requires_grad"].get(name, True))
    return model
