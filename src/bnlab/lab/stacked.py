"""Many small MLPs of one shape, trained at once: parameters stacked on a network axis.

A sweep (16 init scales × BN on/off × 3 seeds, or 12 learning rates × …) trains dozens of
networks of the same shape. Instead of a Python loop over networks, :class:`StackedMLP` holds
G networks' weights in stacked tensors and runs every layer for all of them with one batched
matrix product, in float32.

Layout: activations are *feature-major*, shape (G·H, N): row g·H + j is feature j of network g,
column n is example n. So

- the first layer of all G networks is one matrix product ``W0 (G·H, D) @ x (D, N)`` when the
  networks share their input, or a bmm over groups when groups of networks see different batches;
- a hidden layer is ``torch.bmm(W (G, H', H), h.view(G, H, N))``, with no copy;
- BN of every feature of every network is ONE call of ``bn(h.t(), …)``: ``h.t()`` is an (N, G·H)
  view whose column g·H + j is network g's feature j, exactly the (N, C) input of
  ``bnlab.functional.batch_norm`` (forward and its hand-derived backward), with running
  statistics as (G·H,) buffers.

Networks are independent: no operation mixes two networks' rows, so a network that diverges
(NaN) leaves the others untouched. Each network's weights are drawn from its own generator
(``init_seeds``), so a network's initial weights do not depend on what else is in the stack.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bnlab

__all__ = ["StackedMLP", "batch_norm_function", "stacked_loss_and_accuracy"]

_ACTIVATIONS = {"relu": torch.relu_, "sigmoid": torch.sigmoid_}  # in place: see hidden_forward


def batch_norm_function(impl: str):
    """bnlab.functional.batch_norm ("bnlab") or torch.nn.functional.batch_norm ("torch"): same signature."""
    if impl == "bnlab":
        return bnlab.functional.batch_norm
    if impl == "torch":
        return F.batch_norm
    raise ValueError(f"bn_impl: expected 'bnlab' or 'torch', got {impl!r}")


class StackedMLP:
    """G MLPs with the same layer sizes: Linear → [BN] → activation → [dropout] per hidden layer, then Linear.

    Args:
        sizes: layer widths [D, H1, ..., HL, K].
        init_seeds: one seed per network (G = len(init_seeds)); network g's weights come from
            ``torch.Generator().manual_seed(init_seeds[g])``.
        groups: S, the number of groups of consecutive networks that see the same batches
            (e.g. one group per seed); G must be a multiple of S.
        activation: "relu" or "sigmoid".
        batchnorm: BN after each hidden linear layer, whose bias is then dropped.
        bn_impl: "bnlab" or "torch".
        init: weight init: "he" (N(0, 2/fan_in)), "lecun" (N(0, 1/fan_in)), or a (G,) tensor of
            standard deviations used for every layer of each network (the init-sweep). Biases start at 0.
        dropout: (G,) dropout probabilities after each hidden activation, or None.
        momentum, eps: of the BN layers.
        device: where the parameters live.
    """

    def __init__(self, sizes: list[int], init_seeds: list[int], groups: int = 1, *, activation: str = "relu",
                 batchnorm: bool = False, bn_impl: str = "bnlab", init: str | Tensor = "he",
                 dropout: Tensor | None = None, momentum: float = 0.1, eps: float = 1e-5,
                 device: torch.device | str = "cpu") -> None:
        G = len(init_seeds)
        if len(sizes) < 3:
            raise ValueError(f"sizes: expected [input, hidden..., output] with at least one hidden layer, got {sizes}")
        if G == 0 or groups < 1 or G % groups:
            raise ValueError(f"groups: expected a positive divisor of the number of networks {G}, got {groups}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.sizes, self.num_nets, self.groups = list(sizes), G, groups
        self.hidden = list(sizes[1:-1])
        self.activation, self.batchnorm = activation, batchnorm
        self.bn_fn = batch_norm_function(bn_impl)
        self.momentum, self.eps = momentum, eps
        self.device = torch.device(device)
        stds = self._init_stds(init, G)
        layers = [self._draw(init_seeds, layer, fan_in, fan_out, stds)
                  for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]))]
        # First layer as one (G·H1, D) matrix: all networks' first layers in a single product.
        self.weights = [layers[0].reshape(G * sizes[1], sizes[0])] + layers[1:]
        for w in self.weights:
            w.requires_grad_()
        zeros = lambda *shape: torch.zeros(*shape, device=self.device, requires_grad=True)  # noqa: E731
        self.bias_out = zeros(G, sizes[-1], 1)
        if batchnorm:
            self.gamma = [torch.ones(G * h, device=self.device, requires_grad=True) for h in self.hidden]
            self.beta = [zeros(G * h) for h in self.hidden]
            self.running_mean = [torch.zeros(G * h, device=self.device) for h in self.hidden]
            self.running_var = [torch.ones(G * h, device=self.device) for h in self.hidden]
            self.bias = []
        else:
            self.gamma = self.beta = self.running_mean = self.running_var = []
            self.bias = [zeros(G * h, 1) for h in self.hidden]
        self.dropout = None
        if dropout is not None:
            dropout = torch.as_tensor(dropout, dtype=torch.float32, device=self.device).reshape(-1)
            if dropout.numel() != G or bool(((dropout < 0) | (dropout >= 1)).any()):
                raise ValueError(f"dropout: expected {G} probabilities in [0, 1), got {dropout.tolist()}")
            self.dropout = dropout

    def _init_stds(self, init: str | Tensor, G: int):
        if isinstance(init, str):
            if init not in ("he", "lecun"):
                raise ValueError(f"init: expected 'he', 'lecun' or a tensor of {G} standard deviations, got {init!r}")
            return init
        stds = torch.as_tensor(init, dtype=torch.float32).reshape(-1)
        if stds.numel() != G:
            raise ValueError(f"init: expected {G} standard deviations (one per network), got {stds.numel()}")
        return stds.tolist()

    def _draw(self, init_seeds: list[int], layer: int, fan_in: int, fan_out: int, stds) -> Tensor:
        """(G, fan_out, fan_in) weights of one layer, network g's drawn from its own generator."""
        gain = {"he": 2.0, "lecun": 1.0}
        out = torch.empty(self.num_nets, fan_out, fan_in)
        for g, seed in enumerate(init_seeds):
            # One stream per (network seed, layer), so that networks and layers never share weights.
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))
            std = math.sqrt(gain[stds] / fan_in) if isinstance(stds, str) else stds[g]
            out[g] = torch.randn(fan_out, fan_in, generator=gen) * std
        return out.to(self.device)

    def parameters(self) -> list[Tensor]:
        """Every trainable tensor; each has the network index as its leading factor (``p.view(G, -1)``)."""
        return [*self.weights, *self.bias, self.bias_out, *self.gamma, *self.beta]

    def first_preact(self, x: Tensor) -> Tensor:
        """First-layer pre-activations without bias, (G·H1, N).

        ``x`` is (D, N) when every network sees the same examples, or (S, D, N) with one batch per group.
        """
        w = self.weights[0]
        if x.dim() == 2:
            return w @ x
        S, rows = self.groups, w.shape[0] // self.groups
        return torch.bmm(w.view(S, rows, -1), x).view(-1, x.shape[-1])

    def hidden_forward(self, h: Tensor, training: bool, dropout_generator: torch.Generator | None = None,
                       capture: list[Tensor] | None = None) -> Tensor:
        """Logits (G, K, N) from the first layer's pre-activations ``h`` (G·H1, N).

        ``capture``, if given, receives each hidden layer's input to the nonlinearity (G·H, N), detached.
        """
        G, N = self.num_nets, h.shape[1]
        act_ = _ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden):
            # Bias, BN and activation act on a freshly made tensor ``z``, in place where autograd allows:
            # BN's backward and the bias add need not their outputs, and the activation keeps its own.
            # (In-place ops on *views* would make autograd copy in the backward, so z is never a view.)
            if self.batchnorm:
                # (N, G·H) view: every network's every feature is one BN channel.
                z = self.bn_fn(h.reshape(-1, N).t(), self.running_mean[i], self.running_var[i], self.gamma[i], self.beta[i],
                               training, self.momentum, self.eps)  # (N, G·H), a new tensor
            elif i == 0:
                z = h + self.bias[0]  # h may be a leaf (the dual first layer): not in place
            else:
                z = h.add_(self.bias[i].view(G, width, 1))  # h: the previous bmm's (G, H, N) output
            if capture is not None:
                capture.append((z.t() if self.batchnorm else z).detach().reshape(-1, N).clone())
            z = act_(z)
            h = z.t() if self.batchnorm else z.reshape(-1, N)  # (G·H, N), a view
            if training and self.dropout is not None:
                p = self.dropout[:, None, None]  # (G, 1, 1)
                keep = torch.rand(G, width, N, generator=dropout_generator, device=h.device) >= p
                h = (h.reshape(G, width, N) * keep / (1 - p)).reshape(G * width, N)
            h = torch.bmm(self.weights[i + 1], h.reshape(G, width, N))  # (G, H', N), a new tensor
        return h + self.bias_out

    def forward(self, x: Tensor, training: bool, **kwargs) -> Tensor:
        """Logits (G, K, N) for inputs x: (D, N) shared by every network or (S, D, N) per group."""
        return self.hidden_forward(self.first_preact(x), training, **kwargs)

    @torch.no_grad()
    def sgd_step(self, lr: Tensor) -> None:
        """p -= lr[g] · ∂L/∂p for every parameter of network g; lr is (G,). Clears the gradients."""
        for p in self.parameters():
            if p.grad is not None:
                p.view(self.num_nets, -1).addcmul_(p.grad.view(self.num_nets, -1), lr[:, None], value=-1.0)
                p.grad = None


def stacked_loss_and_accuracy(logits: Tensor, targets: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-network mean cross-entropy and accuracy.

    Args:
        logits: (G, K, N).
        targets: (N,) shared by all networks, or (S, N) with one row per group of G/S networks.
        groups: S.

    Returns:
        (loss (G,), accuracy (G,)); the loss keeps its graph.
    """
    G = logits.shape[0]
    t = targets.expand(G, -1) if targets.dim() == 1 else targets.repeat_interleave(G // groups, dim=0)
    loss = F.cross_entropy(logits, t, reduction="none").mean(1)
    accuracy = (logits.detach().argmax(1) == t).float().mean(1)
    return loss, accuracy
