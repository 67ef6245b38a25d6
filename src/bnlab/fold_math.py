"""The arithmetic of ``bnlab.fold``: an eval-mode BN's per-channel affine map merged into a layer.

In eval mode BN is y = s·x + t per channel, s = γ / sqrt(σ²_run + eps), t = β - s·μ_run
(docs/math.md §6). Two merges are exact:

- into the layer **before** it (z = W·a + b, then BN): every weight of output channel o is scaled
  by s[o], and b' = s·b + t;
- into the layer **after** it (BN, then z = W·y + b): every weight that reads input channel i is
  scaled by s[i], and b'[o] = b[o] + Σ W[o, i, k]·t[i] over the inputs and kernel positions of o.
  For a convolution this holds only where every position it reads is a BN output: no zero padding,
  since the folded layer would in effect read s·0 + t = t where the original reads a padded zero
  (``padding_mode`` reflect, replicate and circular pad with copies of BN's outputs: fine).

Everything is computed in float64 from the current weights and rounded once to their dtype.
Weight layouts (PyTorch's): Linear (out, in); ConvNd (out, in/groups, *k); ConvTransposeNd
(in, out/groups, *k), whose output channel g·(out/groups) + j is column j of the g-th block of
in/groups input rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = ["bn_affine", "fold_into_previous", "fold_into_next", "reads_only_bn_outputs"]

F64 = torch.float64


def bn_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """(s, t), float64 (C,) each: the eval-mode map y = s·x + t of bn's running statistics."""
    s = torch.rsqrt(bn.running_var.to(F64) + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.to(F64)
    t = -bn.running_mean.to(F64) * s
    if bn.bias is not None:
        t = t + bn.bias.to(F64)
    return s, t


def _per_output_channel(layer: nn.Module, v: Tensor) -> Tensor:
    """v (out channels,) laid out as layer.weight, each weight given its output channel's value."""
    w = layer.weight
    kernel = w.shape[2:]
    if isinstance(layer, _ConvTransposeNd):
        g = layer.groups
        blocks = v.view(g, 1, w.shape[1], *(1,) * len(kernel))  # (groups, 1, out/groups, 1...)
        return blocks.expand(g, w.shape[0] // g, w.shape[1], *kernel).reshape(w.shape)
    return v.view(-1, *(1,) * (w.dim() - 1)).expand(w.shape)


def _per_input_channel(layer: nn.Module, v: Tensor) -> Tensor:
    """v (in channels,) laid out as layer.weight (Linear or ConvNd), each weight given its input's value."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return v.view(1, -1).expand(w.shape)
    g, out = layer.groups, w.shape[0]
    # output channel o reads the input channels of its group, o // (out/groups), as weight rows
    rows = v.view(g, 1, w.shape[1]).expand(g, out // g, w.shape[1]).reshape(out, w.shape[1])
    return rows.view(*rows.shape, *(1,) * (w.dim() - 2)).expand(w.shape)


def _set_bias(layer: nn.Module, bias64: Tensor) -> None:
    """layer.bias = bias64 rounded to the weight's dtype (a new Parameter if the layer had none)."""
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(bias64.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias64.to(layer.bias.dtype))


@torch.no_grad()
def fold_into_previous(layer: nn.Module, bn: _BatchNorm) -> None:
    """Merge bn into the Linear, ConvNd or ConvTransposeNd layer whose output it normalizes (in place)."""
    s, t = bn_affine(bn)
    w64 = layer.weight.to(F64)
    bias = t if layer.bias is None else s * layer.bias.to(F64) + t
    layer.weight.copy_((w64 * _per_output_channel(layer, s)).to(layer.weight.dtype))
    _set_bias(layer, bias)


@torch.no_grad()
def fold_into_next(bn: _BatchNorm, layer: nn.Module) -> None:
    """Merge bn into the Linear or ConvNd layer that reads its output (in place); the layer must read
    nothing but BN outputs (:func:`reads_only_bn_outputs`)."""
    s, t = bn_affine(bn)
    w64 = layer.weight.to(F64)
    through_t = (w64 * _per_input_channel(layer, t)).sum(dim=tuple(range(1, w64.dim())))  # (out,)
    bias = through_t if layer.bias is None else layer.bias.to(F64) + through_t
    layer.weight.copy_((w64 * _per_input_channel(layer, s)).to(layer.weight.dtype))
    _set_bias(layer, bias)


def reads_only_bn_outputs(conv: _ConvNd) -> bool:
    """Whether every value the convolution reads is one of its input's (no zero padding)."""
    if conv.padding_mode != "zeros":
        return True  # reflect / replicate / circular: copies of input values
    if conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return all(p == 0 for p in conv.padding)
