"""Plain SGD for a :class:`~bnlab.lab.stacked.StackedMLP`: per-group data order, per-network learning rates.

The first layer's dual form
---------------------------
With plain SGD, the first layer's weights only ever move by ``-lr · dH1 @ X_bᵀ`` (feature-major:
dH1 (G·H1, B) is the gradient at the batch's first-layer pre-activations, X_b (D, B) the batch).
So the pre-activations of every training example, ``P = W0 @ Xᵀ`` (G·H1, n), follow

    P ← P - lr · dH1 @ (X_b Xᵀ) = P - lr · dH1 @ K[batch, :],   K = X Xᵀ (n, n), computed once,

and the weights themselves are ``W0 = W0_init + A @ X`` where A (G·H1, n) accumulates
``-lr · dH1`` at the batch's columns. This is the same SGD, exactly (up to float rounding);
it just stores the first layer by its effect on the training set. When the training set is
small (n < 2·D: the init-sweep's 1,000 images against D = 784 inputs) it is cheaper: one
(G·H1 × B × n) product per step replaces the forward (G·H1 × D × B) and weight-gradient
(G·H1 × B × D) products, and the per-epoch training-accuracy pass needs no first-layer product
at all, which removes about 40 % of the init-sweep's arithmetic. ``first_layer="primal"``
turns it off; tests/lab/test_stacked.py checks that both give the same networks.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from bnlab.lab.stacked import StackedMLP, stacked_loss_and_accuracy

__all__ = ["StackedTrainer"]


class _DualFirstLayer:
    """P = X W0ᵀ for the n training examples, updated by SGD in the dual form (module docstring).

    Stored sample-major, (S, n, M·H1) per group of M networks, so that gathering a batch's rows
    and adding into them touch contiguous memory.
    """

    def __init__(self, net: StackedMLP, x_train: Tensor) -> None:
        self.net, self.x = net, x_train  # (n, D)
        S, n = net.groups, x_train.shape[0]
        self.gram = x_train @ x_train.t()  # K (n, n), symmetric
        with torch.no_grad():
            w = net.weights[0].detach()
            self.preact = torch.matmul(x_train, w.view(S, -1, w.shape[1]).transpose(1, 2))  # (S, n, M·H1)
        self.w_init = w.clone()
        self.coef = torch.zeros_like(self.preact)  # A: W0 = W0_init + Aᵀ X per group

    def _rows(self, idx: Tensor) -> Tensor:
        """Flat row numbers of idx (S, B) in the (S·n, M·H1) view of the caches."""
        n = self.x.shape[0]
        return (idx + n * torch.arange(idx.shape[0], device=idx.device)[:, None]).reshape(-1)

    def batch(self, idx: Tensor) -> Tensor:
        """The batch's first-layer pre-activations (G·H1, B), a leaf that collects their gradient; idx (S, B)."""
        S, B = idx.shape
        rows = self.preact.view(S * self.x.shape[0], -1).index_select(0, self._rows(idx))  # (S·B, M·H1)
        return rows.view(S, B, -1).transpose(1, 2).reshape(-1, B).requires_grad_()  # feature-major

    def columns(self, cols: slice) -> Tensor:
        """First-layer pre-activations (G·H1, c) of the training examples ``cols`` (the same for every group)."""
        return self.preact[:, cols, :].transpose(1, 2).reshape(-1, cols.stop - cols.start)

    @torch.no_grad()
    def update(self, h1: Tensor, idx: Tensor, lr_rows: Tensor) -> None:
        """Apply one SGD step given ``h1`` (the leaf from :meth:`batch`, after backward)."""
        S, B = idx.shape
        step = (h1.grad * lr_rows).view(S, -1, B).transpose(1, 2)  # (S, B, M·H1): lr · dH1, sample-major
        self.preact.baddbmm_(self.gram[idx].transpose(1, 2), step, alpha=-1.0)  # P -= K[:, idx] @ (lr·dH1)ᵀ
        self.coef.view(S * self.x.shape[0], -1).index_add_(0, self._rows(idx), step.reshape(S * B, -1), alpha=-1.0)

    @torch.no_grad()
    def write_weights(self) -> None:
        """Store W0 = W0_init + Aᵀ X into the network's first-layer weight (for inputs other than X)."""
        S = self.net.groups
        w = self.net.weights[0].data.view(S, -1, self.x.shape[1])
        torch.baddbmm(self.w_init.view_as(w), self.coef.transpose(1, 2), self.x.expand(S, -1, -1), out=w)


class StackedTrainer:
    """Trains a StackedMLP with plain SGD (no momentum, no weight decay), all networks at once.

    Args:
        net: the stacked networks (G of them, in S groups).
        x_train: (n, D) float32 training inputs (shared by every network).
        y_train: (n,) int64 labels.
        lr: (G,) learning rate of each network (or a float for all).
        batch_size: B; an epoch is n // B batches (the last partial batch is dropped).
        group_seeds: S seeds; group s draws its batch order from its own generator.
        first_layer: "dual", "primal", or "auto" (dual when n < 2·D, see the module docstring).
        dropout_seed: seed of the dropout masks (used only if the net has dropout).
    """

    def __init__(self, net: StackedMLP, x_train: Tensor, y_train: Tensor, lr: Tensor | float, batch_size: int,
                 group_seeds: list[int], first_layer: str = "auto", dropout_seed: int = 0) -> None:
        if len(group_seeds) != net.groups:
            raise ValueError(f"group_seeds: expected {net.groups} seeds (one per group), got {len(group_seeds)}")
        if first_layer not in ("auto", "dual", "primal"):
            raise ValueError(f"first_layer: expected 'auto', 'dual' or 'primal', got {first_layer!r}")
        n, D = x_train.shape
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size: expected 1..{n} (the training set size), got {batch_size}")
        self.net, self.x, self.y, self.batch_size = net, x_train, y_train, batch_size
        self.lr = torch.as_tensor(lr, dtype=torch.float32, device=net.device).expand(net.num_nets).clone()
        self.generators = [torch.Generator().manual_seed(s) for s in group_seeds]
        self.dropout_generator = torch.Generator(device=net.device).manual_seed(dropout_seed)
        use_dual = first_layer == "dual" or (first_layer == "auto" and n < 2 * D)
        self.dual = _DualFirstLayer(net, x_train) if use_dual else None
        self.diverged = torch.zeros(net.num_nets, dtype=torch.bool, device=net.device)
        self.steps = 0

    def epoch(self) -> Iterator[Tensor]:
        """The batches of one epoch: (S, B) index tensors, each group in its own shuffled order."""
        n, B = len(self.y), self.batch_size
        perms = torch.stack([torch.randperm(n, generator=g) for g in self.generators]).to(self.net.device)
        for start in range(0, n - B + 1, B):
            yield perms[:, start : start + B]

    def batches(self) -> Iterator[Tensor]:
        """Epoch after epoch of batches, for loops counted in steps."""
        while True:
            yield from self.epoch()

    def step(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """One SGD step of every network on its group's batch idx (S, B). Returns per-network (loss, accuracy).

        A network whose loss is not finite is marked in ``self.diverged`` and stops moving (lr 0).
        """
        net = self.net
        y = self.y[idx]  # (S, B)
        h1 = self.dual.batch(idx) if self.dual is not None else net.first_preact(self.x[idx].transpose(1, 2))
        logits = net.hidden_forward(h1, True, dropout_generator=self.dropout_generator)
        loss, acc = stacked_loss_and_accuracy(logits, y, net.groups)
        loss.sum().backward()  # networks are independent: each gets the gradient of its own mean loss
        with torch.no_grad():
            self.diverged |= ~torch.isfinite(loss.detach())
            self.lr.masked_fill_(self.diverged, 0.0)
            if self.dual is not None:
                rows = self.lr.repeat_interleave(h1.shape[0] // net.num_nets)[:, None]
                self.dual.update(h1, idx, rows)
            net.sgd_step(self.lr)
        self.steps += 1
        return loss.detach(), acc

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 250, capture: bool = False):
        """Eval-mode (running statistics) loss and accuracy of every network on (x (n, D), y (n,)).

        Evaluated ``chunk`` examples at a time (eval mode treats examples independently), which
        keeps the (G·H, chunk) activations in cache.

        Returns (loss (G,), accuracy (G,)), plus, if ``capture``, each hidden layer's inputs to the
        nonlinearity as (G·H, n) tensors.
        """
        if self.dual is not None:
            self.dual.write_weights()
        return _evaluate(self.net, lambda s: self.net.first_preact(x[s].t()), y, chunk, capture)

    @torch.no_grad()
    def evaluate_train(self, chunk: int = 250) -> tuple[Tensor, Tensor]:
        """Eval-mode loss and accuracy on the whole training set (free of first-layer products in dual form)."""
        if self.dual is None:
            return self.evaluate(self.x, self.y, chunk)
        return _evaluate(self.net, self.dual.columns, self.y, chunk, False)


def _evaluate(net: StackedMLP, first, y: Tensor, chunk: int, capture: bool):
    n = len(y)
    losses, correct, captured = torch.zeros(net.num_nets), torch.zeros(net.num_nets), []
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        layers: list[Tensor] | None = [] if capture else None
        logits = net.hidden_forward(first(s), False, capture=layers)
        loss, acc = stacked_loss_and_accuracy(logits, y[s], 1)
        weight = (s.stop - s.start) / n
        losses += loss.cpu() * weight
        correct += acc.cpu() * weight
        if capture:
            captured.append(layers)
    if capture:
        return losses, correct, [torch.cat([c[i] for c in captured], dim=1) for i in range(len(net.hidden))]
    return losses, correct
