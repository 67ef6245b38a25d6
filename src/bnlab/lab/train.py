"""Shared training loop and evaluation for torch.nn models (the conv, resnet and inference experiments).

The loop takes a ready model, optimizer and batch iterator from the experiment and builds
none of them, so the same loop drives a model wrapped in DistributedDataParallel with a
sharded iterator (``tensor_batches(..., shard=(rank, world_size))``): every rank then records
the mean loss over all ranks and stops at the same step. Sweeps of many small MLPs use
bnlab.lab.stacked_train instead.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bnlab.lab.runs import progress

__all__ = ["index_batches", "tensor_batches", "global_mean_loss", "evaluate", "train_loop"]


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
                   device: torch.device | str | None = None,
                   shard: tuple[int, int] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled (x, y) mini-batches, optionally augmented by ``transform(x_batch, generator)``.

    Args:
        x, y: the examples (N, ...) and their labels (N,).
        batch_size: the global batch: with ``shard``, the ranks' batches together.
        generator: drives the shuffle (and the transform); give every rank the same seed.
        transform: augmentation of a whole global batch, e.g. random crops.
        device: where the batches go.
        shard: (rank, world_size): yield only this rank's consecutive slice of each global batch,
            so that the ranks' slices concatenated in rank order are exactly the batch one
            process would get with the same generator. ``batch_size`` must divide evenly.

    Shape: yields x (batch_size / world_size, ...) and y (batch_size / world_size,) with ``shard``.
    """
    rank, world = shard if shard is not None else (0, 1)
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard: expected (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    if batch_size % world:
        raise ValueError(f"batch_size: expected a multiple of the {world} processes (each takes an equal share), "
                         f"got {batch_size}")
    part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    for idx in index_batches(len(y), batch_size, generator):
        if transform is None:
            idx = idx[part]  # gather only this rank's examples
        xb, yb = x[idx], y[idx]
        if transform is not None:
            # Augment the global batch, then slice: the generator advances as in one process.
            xb, yb = transform(xb, generator)[part], yb[part]
        yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)


def global_mean_loss(loss: Tensor, model: nn.Module) -> Tensor:
    """The mean of ``loss`` over the ranks of a DistributedDataParallel ``model`` (detached); itself otherwise.

    With equal shards this is the loss of the whole global batch, the number one process would
    record; and every rank sees the same value, so they all stop at the same step.
    """
    value = loss.detach()
    if isinstance(model, DistributedDataParallel):
        value = value.clone()
        dist.all_reduce(value, group=model.process_group)
        value /= dist.get_world_size(model.process_group)
    return value


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
        batches: an iterator of (x, y) already on the model's device (under DDP, this rank's shard).
        steps: number of updates.
        scheduler: stepped after every update, if given.
        eval_every: call ``on_eval(step)`` every this many steps (0: only after the last step).
        on_eval: evaluation callback, also called after the last step (and at a divergence).
        desc: label of the progress bar.
        losses: a list to append each step's training loss to as it goes (so that ``on_eval`` can read it).

    Returns:
        The training loss of every step taken (shorter than ``steps`` if the loss diverged); under
        DDP the mean over the ranks (:func:`global_mean_loss`), the same on every rank.
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
            value = float(global_mean_loss(loss, model))
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
