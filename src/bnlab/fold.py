"""``bnlab.fold``: fold eval-mode BatchNorm layers into the convolution or linear layer before them.

In evaluation mode BN is a fixed per-channel affine map, y = s·(z - μ) + β with
s = γ / sqrt(σ² + eps), applied to z = W·x + b. Composing the two gives one layer with
W' = s·W (each output channel's filter scaled) and b' = s·(b - μ) + β, so at inference BN costs
nothing (docs/math.md §5). The arithmetic is done in float64 and rounded once to the layer's dtype.

Which BN follows which layer: the model is traced with torch.fx (convolutions, linear layers and
BN layers as leaves) and a BN is folded when its input is the output of a Conv1d/2d/3d or Linear
used by nothing else, each module being called once. Models that torch.fx cannot trace
(data-dependent control flow) fall back to adjacency inside nn.Sequential containers.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold", "foldable_pairs"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    """An eval-mode BN with running statistics, sized for the layer's outputs, after a conv/linear layer."""
    if not isinstance(layer, _LAYERS) or not isinstance(bn, _BatchNorm) or bn.training:
        return False
    if getattr(bn, "residual", False) or not hasattr(bn, "running_mean"):
        return False  # a fused BN + residual add needs its second input: nothing to fold into
    if bn.running_mean is None or bn.running_var is None or isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return False  # eval mode without running statistics normalizes with the batch's: not affine
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return False
    return bn.num_features == _out_features(layer)


class _LeafTracer(torch.fx.Tracer):
    """Treats the layers of interest as leaves, whatever package defines them (bnlab's BN too)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm,) + _LAYERS) or super().is_leaf_module(m, qualname)


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm) or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), _LAYERS)):
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1 and len(node.args) == 1:
            pairs.append((src.target, node.target))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            prefix = f"{name}." if name else ""
            for (a_name, a), (b_name, b) in zip(children, children[1:]):
                if isinstance(a, _LAYERS) and isinstance(b, _BatchNorm):
                    pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BN name) of every BN that :func:`fold` would fold into the layer before it.

    Args:
        model: any torch.nn.Module.

    Returns:
        Qualified module names, in execution order (torch.fx) or container order (fallback).
    """
    try:
        pairs = _pairs_by_tracing(model)
    except Exception:  # torch.fx cannot trace every model (control flow on values): use containers
        pairs = _pairs_in_sequentials(model)
    modules = dict(model.named_modules())
    return [(a, b) for a, b in pairs if _can_fold(modules[a], modules[b])]


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    f64 = torch.float64
    scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight.to(f64)
    shift = -bn.running_mean.to(f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(f64)
    weight = layer.weight
    view = (-1,) + (1,) * (weight.dim() - 1)  # the output channel is dim 0 of every folded layer
    weight.copy_((weight.to(f64) * scale.view(view)).to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_((layer.bias.to(f64) * scale + shift).to(layer.bias.dtype))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def fold(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a Conv1d/2d/3d or Linear into that layer.

    The layer's weight is scaled per output channel and its bias set (created if it had none);
    the BN (torch.nn's, bnlab's, SyncBatchNorm; bnlab.BatchNormAct2d keeps its activation) is
    replaced by nn.Identity (or the activation). Grouped and depthwise convolutions are handled:
    their output channels are still dim 0 of the weight. Training-mode BN layers, and BN layers
    without running statistics, are left alone. A Linear followed by BatchNorm1d is folded when
    BN's num_features equals out_features (the usual (N, features) MLP activations).

    Args:
        model: a torch.nn.Module, changed in place; put it in eval mode first (``model.eval()``).

    Returns:
        The same model, for chaining: ``fold(model.eval())``.

    Raises:
        TypeError: model is not a torch.nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    for layer_name, bn_name in foldable_pairs(model):
        bn = modules[bn_name]
        _fold_pair(modules[layer_name], bn)
        replacement = bn.folded_replacement() if hasattr(bn, "folded_replacement") else nn.Identity()
        _replace(model, bn_name, replacement)
    return model
