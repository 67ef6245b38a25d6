"""``bnlab.fold``: fold eval-mode BatchNorm layers into the convolution or linear layer beside them.

In evaluation mode BN is a fixed per-channel affine map, y = s·x + t, so at inference it can be
merged into a neighbouring linear layer and then costs nothing (docs/math.md §6; the arithmetic,
in float64 rounded once to the layer's dtype, is in ``bnlab.fold_math``):

- into the layer **before** it: Conv1d/2d/3d, ConvTranspose1d/2d/3d (decoders, GAN generators)
  or Linear, each output channel's weights scaled;
- otherwise into the layer **after** it: Conv1d/2d/3d or Linear, each input channel's weights
  scaled and the bias shifted (BN on a network's inputs, BN -> conv without an activation
  between). A convolution with zero padding is left alone: the padded zeros would stand for
  values BN never produced.

Which BN is next to which layer: the model is traced with torch.fx (convolutions, linear layers
and BN layers as leaves), and a pair folds when the one's output feeds the other alone, each
module being called once. Models that torch.fx cannot trace (data-dependent control flow) fall
back to adjacency inside nn.Sequential containers, with a warning. A pair where either module
computes otherwise than its tensors say (parametrized or pruned weights, weight norm, forward
hooks, a subclass with its own forward) is left, with a warning naming it.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.fold_math import fold_into_next, fold_into_previous, reads_only_bn_outputs
from bnlab.tools.freeze import MODE_HOOKS

__all__ = ["fold", "foldable_pairs", "foldable_into_next"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BEFORE = _CONVS + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_AFTER = _CONVS + (nn.Linear,)
# BN of these kinds takes (N, C, *spatial) inputs only, whose channel dim is not a Linear's features
_SPATIAL_BN = (nn.BatchNorm2d, nn.BatchNorm3d)


def _is_eval_affine(bn: nn.Module) -> bool:
    """An eval-mode BN with running statistics: a fixed per-channel affine map and nothing more."""
    if not isinstance(bn, _BatchNorm) or bn.training:
        return False
    if getattr(bn, "residual", False) or not hasattr(bn, "running_mean"):
        return False  # a fused BN + residual add needs its second input: nothing to fold into
    if bn.running_mean is None or bn.running_var is None or isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return False  # eval mode without running statistics normalizes with the batch's: not affine
    return True


def _materialized(layer: nn.Module) -> bool:
    return not isinstance(layer.weight, nn.parameter.UninitializedParameter)


#: the methods through which these layers compute; a subclass that overrides one computes something else
_COMPUTING = ("forward", "_conv_forward")


def _why_not_foldable(module: nn.Module) -> str | None:
    """Why folding would not change what ``module`` computes as it changes its tensors, or None.

    Found by the forty-ninth session's audit, each folded without a word into outputs 0.4-6.7 off:
    a weight computed at each access (torch.nn.utils.parametrize, weight_norm's parametrization),
    so the scaled copy was thrown away; one recomputed by a forward pre-hook (torch.nn.utils.prune,
    the legacy weight_norm and spectral_norm hooks), or any hook that may change the inputs or
    outputs; and a subclass computing with its own forward (a weight-standardised convolution, a
    BN that applies an activation), or such a forward set on the instance (the fiftieth session's)."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "its parameters are parametrized (torch.nn.utils.parametrize)"
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    if any(hook not in MODE_HOOKS for hook in hooks):  # (bnlab.freeze's only switch the mode)
        return "it has forward hooks (torch.nn.utils.prune, weight_norm and spectral_norm add them)"
    for method in _COMPUTING:
        if method in module.__dict__:  # set on the instance (accelerate's add_hook_to_module, a patch)
            return f"its {method} is replaced on the instance"
        defined = getattr(type(module), method, None)
        if defined is not None and not getattr(defined, "__module__", "").startswith(("torch.nn.", "bnlab.")):
            return f"its class {type(module).__name__} computes with its own {method}"
    return None


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one place of the model holds (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def _owns_shared(layer: nn.Module, shared: set[int]) -> bool:
    """Whether the layer's weight or bias is tied to another module's: folding would change that one too."""
    return any(p is not None and id(p) in shared for p in (layer.weight, layer.bias))


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    """bn normalizes the output of layer, and can be merged into it."""
    if not isinstance(layer, _BEFORE) or not _is_eval_affine(bn) or not _materialized(layer):
        return False
    if isinstance(layer, nn.Linear):
        return bn.num_features == layer.out_features and not isinstance(bn, _SPATIAL_BN)
    return bn.num_features == layer.out_channels


def _can_fold_into_next(bn: nn.Module, layer: nn.Module) -> bool:
    """layer reads the output of bn, and bn can be merged into it."""
    if not isinstance(layer, _AFTER) or not _is_eval_affine(bn) or not _materialized(layer):
        return False
    if hasattr(bn, "folded_replacement") and not isinstance(bn.folded_replacement(), nn.Identity):
        return False  # BN + activation (BatchNormAct2d): the activation sits between the two
    if isinstance(layer, nn.Linear):
        return bn.num_features == layer.in_features and not isinstance(bn, _SPATIAL_BN)
    return bn.num_features == layer.in_channels and reads_only_bn_outputs(layer)


class _LeafTracer(torch.fx.Tracer):
    """Treats the layers of interest as leaves, whatever package defines them (bnlab's BN too)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm,) + _BEFORE) or super().is_leaf_module(m, qualname)


def _adjacent_by_tracing(model: nn.Module, first_kinds: tuple, second_kinds: tuple) -> list[tuple[str, str]]:
    """(first, second) module names where second's only argument is first's output, used by nothing
    else, and each module is called once, in execution order."""
    graph = _LeafTracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), second_kinds) or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), first_kinds)):
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs:
            pairs.append((src.target, node.target))
    return pairs


def _adjacent_in_sequentials(model: nn.Module, first_kinds: tuple, second_kinds: tuple) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            prefix = f"{name}." if name else ""
            for (a_name, a), (b_name, b) in zip(children, children[1:]):
                if isinstance(a, first_kinds) and isinstance(b, second_kinds):
                    pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def _adjacent(model: nn.Module, first_kinds: tuple, second_kinds: tuple,
              notes: list[str] | None = None) -> list[tuple[str, str]]:
    """The adjacent pairs by tracing, or else by nn.Sequential order, which ``notes`` then records
    (a member the model's forward also calls elsewhere folds all the same: fold warns of it)."""
    try:
        return _adjacent_by_tracing(model, first_kinds, second_kinds)
    except Exception as err:  # torch.fx cannot trace every model (control flow on values): use containers
        pairs = _adjacent_in_sequentials(model, first_kinds, second_kinds)
        if notes is not None and pairs:
            notes.append(f"torch.fx could not trace the model ({type(err).__name__}: {err}), so adjacent members "
                         f"of nn.Sequential containers were taken to feed each other and nothing else "
                         f"({', '.join(' -> '.join(map(repr, pair)) for pair in pairs)}): a member the forward "
                         "also calls elsewhere would compute otherwise after the fold")
        return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BN name) of every BN that :func:`fold` would fold into the layer before it.

    Args:
        model: any torch.nn.Module.

    Returns:
        Qualified module names, in execution order (torch.fx) or container order (fallback).

    Raises:
        TypeError: model is not a torch.nn.Module.
    """
    return _foldable(model, _BEFORE, _BatchNorm, _can_fold, layer_at=0)


def foldable_into_next(model: nn.Module) -> list[tuple[str, str]]:
    """(BN name, layer name) of every BN that could be folded into the layer after it, the layer
    reading that BN's output alone (:func:`fold` folds these unless the BN goes into the layer
    before it, or ``into_next=False``).

    Args:
        model: any torch.nn.Module.

    Returns:
        Qualified module names, in execution order (torch.fx) or container order (fallback).

    Raises:
        TypeError: model is not a torch.nn.Module.
    """
    return _foldable(model, _BatchNorm, _AFTER, _can_fold_into_next, layer_at=1)


def _foldable(model: nn.Module, first_kinds: tuple, second_kinds: tuple, can_fold, layer_at: int,
              notes: list[str] | None = None) -> list[tuple[str, str]]:
    """The adjacent (first, second) pairs that can_fold(first, second) accepts, leaving out those
    whose conv/linear layer (pair[layer_at]) has a weight or bias tied to another module, and those
    where either module computes otherwise than its tensors say (:func:`_why_not_foldable`). Where
    ``notes`` is given, such a pair is described there, and so is the fallback of :func:`_adjacent`."""
    _check_model(model)
    modules, shared = dict(model.named_modules()), _shared_tensors(model)
    pairs = []
    for names in _adjacent(model, first_kinds, second_kinds, notes):
        first, second = modules[names[0]], modules[names[1]]
        if not can_fold(first, second) or _owns_shared((first, second)[layer_at], shared):
            continue
        why = next(((name, reason) for name, m in zip(names, (first, second)) if (reason := _why_not_foldable(m))), None)
        if why is None:
            pairs.append(names)
        elif notes is not None:
            notes.append(f"{names[0]!r} and {names[1]!r} left unfolded: at {why[0]!r}, {why[1]}")
    return pairs


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _warn_of_layers_left(model: nn.Module) -> None:
    """A UserWarning naming the BN layers with running statistics that fold leaves because of their
    state: in training mode (they normalize with each batch's statistics; most likely model.eval()
    was not called), or lazy and not yet run (no statistics yet: LazyBatchNorm2d)."""
    training, unsized = [], []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or getattr(m, "running_mean", None) is None:
            continue
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            unsized.append(name or type(m).__name__)
        elif m.training:
            training.append(name or type(m).__name__)
    for names, state, remedy in (
        (training, "in training mode", "call model.eval() first to fold them"),
        (unsized, "lazy and not yet run", "run one batch through the model first, then model.eval()"),
    ):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.warn(
                f"bnlab.fold: {len(names)} BatchNorm layer(s) {state} left unfolded ({shown}); {remedy}",
                UserWarning,
                stacklevel=3,
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def fold(model: nn.Module, *, into_next: bool = True) -> nn.Module:
    """Fold every eval-mode BatchNorm next to a convolution or linear layer into that layer.

    First every BN directly after a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear goes into it:
    the layer's weight is scaled per output channel and its bias set (created if it had none).
    Then, with ``into_next``, every remaining BN whose output only a Conv1d/2d/3d (without zero
    padding) or Linear reads goes into that layer: its weight is scaled per input channel and
    its bias shifted. Each folded BN (torch.nn's, bnlab's, SyncBatchNorm) is replaced by
    nn.Identity; bnlab.BatchNormAct2d keeps its activation, and so folds only into the layer
    before it. Grouped and depthwise convolutions are handled. Training-mode BN layers (with a
    UserWarning naming them: ``model.eval()`` was most likely not called), lazy BN layers that
    have not run yet (with a UserWarning too), BN layers without
    running statistics, and layers whose weight or bias another module shares (tied weights:
    folding would change the other module too) are left alone, and so are, with a UserWarning
    naming them, pairs where either module computes otherwise than its tensors say (parametrized or
    pruned weights, weight norm, forward hooks, a subclass with its own forward); models torch.fx
    cannot trace fold by nn.Sequential order, with a UserWarning. A Linear pairs with a BN that is not a
    BatchNorm2d/3d when the feature counts match: the usual (N, features) activations are
    assumed, as torch.nn's BatchNorm1d after a Linear on (N, L, features) normalizes over L.

    Args:
        model: a torch.nn.Module, changed in place; put it in eval mode first (``model.eval()``).
        into_next: also fold BN layers into the layer after them (default True).

    Returns:
        The same model, for chaining: ``fold(model.eval())``.

    Raises:
        TypeError: model is not a torch.nn.Module, or into_next is not a bool.
    """
    _check_model(model)
    if not isinstance(into_next, bool):
        raise TypeError(f"into_next: expected a bool, got {type(into_next).__name__}")
    _warn_of_layers_left(model)
    notes: list[str] = []
    modules = dict(model.named_modules())
    for layer_name, bn_name in _foldable(model, _BEFORE, _BatchNorm, _can_fold, 0, notes):
        bn = modules[bn_name]
        fold_into_previous(modules[layer_name], bn)
        _replace(model, bn_name, bn.folded_replacement() if hasattr(bn, "folded_replacement") else nn.Identity())
    if into_next:
        # found on the model as now changed: the BNs folded above are gone, and a layer both folds
        # take (BN -> conv -> BN) has its weights from the first fold, which composes exactly
        modules = dict(model.named_modules())
        for bn_name, layer_name in _foldable(model, _BatchNorm, _AFTER, _can_fold_into_next, 1, notes):
            fold_into_next(modules[bn_name], modules[layer_name])
            _replace(model, bn_name, nn.Identity())
    for note in dict.fromkeys(notes):  # (each once: both walks find the same)
        warnings.warn(f"bnlab.fold: {note}", UserWarning, stacklevel=2)
    return model
