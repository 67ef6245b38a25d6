"""The lab's networks as torch.nn modules: an MLP, a small CNN, and the CIFAR ResNets (ResNet-20).

Every network takes ``bn_impl``: "bnlab" (the default everywhere in the lab) builds bnlab's
BatchNorm layers, "torch" builds torch.nn's, for comparison. A linear or conv layer followed by
BN has no bias: BN subtracts the batch mean, which removes any constant added before it
(seed 002), and β takes the bias's role.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab

__all__ = ["BN_IMPLS", "batchnorm_layer", "MLP", "SmallCNN", "CifarResNet", "resnet20"]

BN_IMPLS = ("bnlab", "torch")
_CLASSES = {
    "bnlab": {1: bnlab.BatchNorm1d, 2: bnlab.BatchNorm2d},
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d},
}


def batchnorm_layer(impl: str, dims: int, num_features: int, **kwargs) -> nn.Module:
    """A BatchNorm1d (dims=1) or BatchNorm2d (dims=2) layer from bnlab or torch.nn.

    Args:
        impl: "bnlab" or "torch".
        dims: 1 for (N, C) inputs, 2 for (N, C, H, W).
        num_features: C.
        kwargs: passed on (eps, momentum, ...).
    """
    if impl not in _CLASSES:
        raise ValueError(f"bn_impl: expected one of {list(BN_IMPLS)}, got {impl!r}")
    return _CLASSES[impl][dims](num_features, **kwargs)


_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class MLP(nn.Sequential):
    """Linear → [BN] → activation → [dropout] for each hidden layer, then a linear output layer.

    Args:
        sizes: layer widths, e.g. [784, 100, 100, 100, 10].
        activation: "relu" or "sigmoid".
        batchnorm: BN after each hidden linear layer (whose bias is then dropped).
        dropout: dropout probability after each hidden activation (0 for none).
        bn_impl: "bnlab" or "torch".

    Shape: input (N, sizes[0]); output (N, sizes[-1]) logits.
    """

    def __init__(self, sizes: list[int], activation: str = "relu", batchnorm: bool = False,
                 dropout: float = 0.0, bn_impl: str = "bnlab") -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes: expected at least an input and an output width, got {sizes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers.append(nn.Linear(fan_in, fan_out, bias=not batchnorm))
            if batchnorm:
                layers.append(batchnorm_layer(bn_impl, 1, fan_out))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """conv3x3(16) → norm → ReLU → maxpool → conv3x3(32) → norm → ReLU → maxpool → linear.

    ``norm`` picks what normalizes the conv outputs:
      - "channel": per-channel BN (BatchNorm2d: one mean/var, γ, β per channel over N, H, W) — seed 000;
      - "activation": per-activation BN, as the book's layer does for conv inputs: the (N, C, H, W)
        map is flattened to (N, C·H·W) and each position gets its own statistics, γ and β (BatchNorm1d);
      - "none": no normalization (the convs keep their biases).

    Shape: input (N, in_channels, size, size) with size divisible by 4; output (N, num_classes).
    """

    NORMS = ("channel", "activation", "none")

    def __init__(self, norm: str = "channel", in_channels: int = 1, size: int = 28, num_classes: int = 10,
                 bn_impl: str = "bnlab") -> None:
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError(f"norm: expected one of {list(self.NORMS)}, got {norm!r}")
        self.norm = norm
        widths = [(in_channels, 16, size), (16, 32, size // 2)]
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none") for cin, cout, _ in widths)
        if norm == "channel":
            self.norms = nn.ModuleList(batchnorm_layer(bn_impl, 2, cout) for _, cout, _ in widths)
        elif norm == "activation":
            self.norms = nn.ModuleList(batchnorm_layer(bn_impl, 1, cout * s * s) for _, cout, s in widths)
        else:
            self.norms = nn.ModuleList(nn.Identity() for _ in widths)
        self.head = nn.Linear(32 * (size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            if self.norm == "activation":
                x = norm(x.flatten(1)).view_as(x)  # (N, C·H·W): one feature per position
            else:
                x = norm(x)
            x = F.max_pool2d(F.relu(x), 2)
        return self.head(x.flatten(1))


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut; option A: the shortcut subsamples and pads channels with zeros."""

    def __init__(self, cin: int, cout: int, stride: int, batchnorm_on: bool, bn_impl: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batchnorm_on)
        self.bn1 = batchnorm_layer(bn_impl, 2, cout) if batchnorm_on else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batchnorm_on)
        self.bn2 = batchnorm_layer(bn_impl, 2, cout) if batchnorm_on else nn.Identity()
        self.stride, self.extra_channels = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            # (N, cin, H, W) -> (N, cout, H, W): option A adds no parameters.
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet: depth 6n+2, three stages of n blocks with 16/32/64 channels.

    conv3x3(16) → BN → ReLU → 3 stages (the first block of stages 2 and 3 has stride 2) →
    global average pool → linear. With ``batchnorm=True`` a BN follows every conv (bias-free
    convs). Without BN, the convs get biases and, if ``zero_init_residual``, the last conv of
    each residual branch starts at zero so that every block starts as the identity (a recipe
    that trains without BN; see the resnet experiment).

    Shape: input (N, in_channels, H, W); output (N, num_classes).
    """

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, batchnorm: bool = True,
                 bn_impl: str = "bnlab", zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth!r}")
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not batchnorm)
        self.stem_bn = batchnorm_layer(bn_impl, 2, 16) if batchnorm else nn.Identity()
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_BasicBlock(cin, cout, stride, batchnorm, bn_impl))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")  # He et al. 2015: keeps the forward scale
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_residual:
            for block in self.blocks:
                nn.init.zeros_(block.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (n = 3): 19 conv layers and one linear layer, 0.27 M parameters on CIFAR-10."""
    return CifarResNet(depth=20, **kwargs)
