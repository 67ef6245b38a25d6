"""The batch-size experiment's network, alone (:class:`CNN`) and S seeds at once (:class:`StackedCNN`).

:class:`CNN`, for 14×14 inputs:

    conv3x3(8, pad 1)  → norm → ReLU → maxpool 2     14×14: a norm sees B·196 values per channel
    conv3x3(16, pad 1) → norm → ReLU → maxpool 2      7×7:  B·49 values per channel
    conv3x3(32, no pad) → norm → ReLU → linear(10)    3×3 → 1×1: B values per channel

The last conv turns the 3×3 map into 1×1, as LeNet-5's C5 does, so its norm layer sees one
value per sample and channel, like a norm after a fully-connected layer: the three layers span
the range of "values per channel" a BN layer can get from a batch of B.

The experiment trains one network per (normalization, batch size, seed). At small batches a
step is mostly fixed per-layer overhead, so :class:`StackedCNN` trains the S seeds' networks as
one: every layer's channels are the S networks' channels side by side (seed s owns channels
s·C … s·C + C - 1), the convs are grouped convs (groups = S), and a norm layer built for S·C
channels treats each channel on its own (BN and its variants) or normalizes groups of channels
that lie inside one network (GroupNorm with C divisible by its channels per group). No
operation mixes two networks, the loss is the sum of the S networks' losses, and SGD is
elementwise, so training the stack is training the S networks (tests/lab/test_batch_size_net.py
checks it against S separate CNNs). Each network starts from its own CNN's weights, so seed s
gives the same network whatever else is in the stack.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WIDTHS", "CNN", "StackedCNN", "NormFactory"]

#: channels of the three conv layers.
WIDTHS = (8, 16, 32)
_PADDING = (1, 1, 0)

#: norm(channels) -> a module normalizing (N, channels, H, W); None means no normalization.
NormFactory = Callable[[int], nn.Module]


class CNN(nn.Module):
    """One network (module docstring). Convs have biases only without normalization.

    Args:
        norm: ``norm(C)`` builds the layer after each conv, or None for none.
        num_classes: outputs.

    Shape: input (N, 1, 14, 14); output (N, num_classes).
    """

    def __init__(self, norm: NormFactory | None, num_classes: int = 10) -> None:
        super().__init__()
        channels = (1, *WIDTHS)
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=pad, bias=norm is None)
            for cin, cout, pad in zip(channels, channels[1:], _PADDING)
        )
        self.norms = nn.ModuleList(norm(c) if norm is not None else nn.Identity() for c in WIDTHS)
        self.head = nn.Linear(WIDTHS[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        return self.head(x.flatten(1))  # (N, 32·1·1)


def _stack_state(stacked: nn.Module, singles: list[nn.Module]) -> None:
    """Copy the singles' parameters and buffers into ``stacked``: per-channel tensors side by side, scalars from the first."""
    own = stacked.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            parts = [m.state_dict()[key] for m in singles]
            target.copy_(torch.cat(parts) if target.dim() else parts[0])


def _unstack_state(stacked: nn.Module, single: nn.Module, s: int, count: int) -> None:
    """The inverse of :func:`_stack_state` for network ``s`` of ``count``."""
    with torch.no_grad():
        for key, target in single.state_dict().items():
            value = stacked.state_dict()[key]
            target.copy_(value.view(count, -1)[s].view_as(target) if value.dim() else value)


class StackedCNN(nn.Module):
    """S :class:`CNN` networks trained as one (module docstring).

    Args:
        nets: the S networks to start from (their weights are copied; they are not modified).
        norm: the factory the nets were built with (called here with S·C channels).

    Shape: input (N, S, 14, 14), channel s being network s's image; output (N, S, num_classes).
    """

    def __init__(self, nets: list[CNN], norm: NormFactory | None) -> None:
        super().__init__()
        S = self.count = len(nets)
        if S == 0:
            raise ValueError("nets: expected at least one CNN to stack, got none")
        self.norm_factory = norm
        self.num_classes = nets[0].head.out_features
        channels = (1, *WIDTHS)
        self.convs = nn.ModuleList(
            nn.Conv2d(S * cin, S * cout, 3, padding=pad, groups=S, bias=norm is None)
            for cin, cout, pad in zip(channels, channels[1:], _PADDING)
        )
        self.norms = nn.ModuleList(norm(S * c) if norm is not None else nn.Identity() for c in WIDTHS)
        for i in range(len(WIDTHS)):
            _stack_state(self.convs[i], [n.convs[i] for n in nets])
            _stack_state(self.norms[i], [n.norms[i] for n in nets])
        self.head_weight = nn.Parameter(torch.empty(S, self.num_classes, WIDTHS[-1]))  # (S, K, F)
        self.head_bias = nn.Parameter(torch.empty(S, self.num_classes))  # (S, K)
        with torch.no_grad():
            self.head_weight.copy_(torch.stack([n.head.weight for n in nets]))
            self.head_bias.copy_(torch.stack([n.head.bias for n in nets]))

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        features = x.reshape(x.shape[0], self.count, -1)  # (N, S, 32): network s's channels are contiguous
        return torch.einsum("nsf,skf->nsk", features, self.head_weight) + self.head_bias

    def network(self, s: int) -> CNN:
        """Network ``s`` as a standalone :class:`CNN` (a copy: weights, running statistics, options)."""
        if not 0 <= s < self.count:
            raise ValueError(f"s: expected a network index in 0..{self.count - 1}, got {s!r}")
        net = CNN(self.norm_factory, self.num_classes).to(self.head_weight.device, self.head_weight.dtype)
        for i in range(len(WIDTHS)):
            _unstack_state(self.convs[i], net.convs[i], s, self.count)
            _unstack_state(self.norms[i], net.norms[i], s, self.count)
        with torch.no_grad():
            net.head.weight.copy_(self.head_weight[s])
            net.head.bias.copy_(self.head_bias[s])
        net.train(self.training)
        return net
