"""Shared training loop and evaluation for torch.nn models (the conv, resnet and inference experiments).

The loop takes a ready model, optimizer and batch iterator from the experiment and builds
none of them, so the same loop drives a model wrapped in DistributedDataParallel with a
sharded iterator. Sweeps of many small MLPs use bnlab.lab.stacked_train instead.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.lab.runs import progress

__all__ = ["index_batches", "tensor_batches", "evaluate", "train_loop"]


def index_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of indices into n examples: epoch after epoch, last partial batch dropped."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size: expected 1..{n} (the number of examples), got {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def tensor_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator,
                   transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                   device: torch.device | str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled (x, y) mini-batches, optionally augmented by ``transform(x_batch, generator)``."""
    for idx in index_batches(len(y), batch_size, generator):
        xb, yb = x[idx], y[idx]
        if transform is not None:
            xb = transform(xb, generator)
        yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500, train_mode: bool = False,
             device: torch.device | str | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode unless ``train_mode``.

    In train mode every batch of ``batch_size`` is normalized with its own statistics; the
    running statistics are saved and restored, so evaluation never changes the model.
    The model's mode is restored afterwards.

    Returns:
        (loss, accuracy) as floats.
    """
    was_training = model.training
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train(train_mode)
    total_loss, correct, n = 0.0, 0, 0
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            n += len(yb)
    finally:
        model.train(was_training)
        if train_mode and saved:
            model.load_state_dict(saved, strict=False)
    return total_loss / max(n, 1), correct / max(n, 1)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
               steps: int, *, scheduler=None, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
               eval_every: int = 0, on_eval: Callable[[int], None] | None = None, desc: str = "train",
               losses: list[float] | None = None) -> list[float]:
    """Run ``steps`` optimizer steps of ``model`` on ``batches``; stop early if the loss is not finite.

    Args:
        model, optimizer: built by the experiment (the model may be wrapped, e.g. in DDP).
        batches: an iterator of (x, y) already on the model's device.
        steps: number of updates.
        scheduler: stepped after every update, if given.
        eval_every: call ``on_eval(step)`` every this many steps (0: only after the last step).
        on_eval: evaluation callback, also called after the last step (and at a divergence).
        desc: label of the progress bar.
        losses: a list to append each step's training loss to as it goes (so that ``on_eval`` can read it).

    Returns:
        The training loss of every step taken (shorter than ``steps`` if the loss diverged).
    """
    losses = [] if losses is None else losses
    iterator = iter(batches)
    model.train()
    bar = progress(total=steps, desc=desc)
    try:
        for step in range(1, steps + 1):
            x, y = next(iterator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = float(loss.detach())
            losses.append(value)
            bar.update(1)
            finished = step == steps or not math.isfinite(value)
            if on_eval is not None and (finished or (eval_every and step % eval_every == 0)):
                on_eval(step)
                model.train()
            if not math.isfinite(value):
                break
    finally:
        bar.close()
    return losses
