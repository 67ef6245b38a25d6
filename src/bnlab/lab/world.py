"""Which process of a distributed lab run this is, and what an experiment needs to train under DDP.

A lab run is distributed when it has more than one process: started by ``bnlab run --nproc N``
(bnlab.launch.run_local_ranks) or by ``torchrun --nproc-per-node=N -m bnlab run``. Every process
runs the same units; :class:`World` tells an experiment which rank it is, :func:`parallel` wraps
its model (SyncBatchNorm with ``--sync-bn``, DistributedDataParallel), and
``train.tensor_batches(..., shard=world.shard)`` gives each rank its slice of the global batch.
Only rank 0 (``world.is_main``) evaluates and writes the run folder.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
from torch import nn

from bnlab.launch import leave_process_group

__all__ = ["World", "SINGLE", "torchrun_world_size", "current_world", "torchrun_group", "share_from_main",
           "parallel", "default_timeout_s"]


@dataclass(frozen=True)
class World:
    """One process's place in a lab run: its rank, the number of processes, its device.

    Attributes:
        rank: 0 .. size - 1; rank 0 evaluates and writes the run folder.
        size: number of processes training together (1: an ordinary run).
        device: this process's torch device (cuda:LOCAL_RANK on GPUs).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this process writes results (rank 0)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, size) for ``train.tensor_batches(shard=...)``, or None in a one-process run."""
        return (self.rank, self.size) if self.size > 1 else None


SINGLE = World()


def default_timeout_s(quick: bool) -> float:
    """How long a rank waits in one collective before failing: short for quick runs (CI), long otherwise.

    It bounds every wait of a distributed run, so a rank that died or hangs ends the run with an
    error instead of a hang. Rank 0 evaluating or writing while the others wait counts too.
    """
    return 60.0 if quick else 600.0


def torchrun_world_size() -> int:
    """WORLD_SIZE set by torchrun (or any env:// launcher, with RANK), else 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer (set by torchrun), got {os.environ['WORLD_SIZE']!r}") from None


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of the process with this local rank: cuda -> cuda:local_rank (mod the GPU count)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_world(device: str) -> World:
    """This process's World: from the initialised default process group, else a one-process world."""
    if not _is_distributed():
        return World(device=torch.device(device))
    import torch.distributed as dist

    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return World(rank=rank, size=dist.get_world_size(), device=rank_device(device, local_rank))


@contextlib.contextmanager
def torchrun_group(device: str, timeout_s: float) -> Iterator[None]:
    """Join torchrun's process group (env://) for the ``with`` block, if this process was started by torchrun.

    Does nothing for a one-process run or when a default group already exists. gloo on CPU, NCCL
    on CUDA; every collective times out after ``timeout_s`` seconds, so a peer that died or hangs
    makes this rank fail instead of waiting forever.
    """
    import torch.distributed as dist

    size = torchrun_world_size()
    if size <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank_device(device, int(os.environ.get("LOCAL_RANK", "0"))))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        leave_process_group()  # the group may outlive destroy_process_group alone (bnlab.launch)


_SHARED_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, FileExistsError)}


def share_from_main(compute: Callable[[], Any], world: World) -> Any:
    """Run ``compute()`` on rank 0 and return its value on every rank (one broadcast).

    If it raises on rank 0, every rank raises: the same ValueError/FileNotFoundError/FileExistsError
    (the CLI prints these as argument errors), or a RuntimeError naming the original one. So a
    bad option or an existing ``--out`` folder stops all ranks at once, and none is left waiting.
    """
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if world.is_main:
        try:
            box[0] = ("ok", compute())
        except BaseException as err:  # noqa: BLE001 - the peers must hear of any failure, then it is re-raised
            error = err
            box[0] = ("error", type(err).__name__, str(err))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, *rest = box[0]
    if status == "ok":
        return rest[0]
    name, message = rest
    raise _SHARED_ERRORS.get(name, RuntimeError)(message if name in _SHARED_ERRORS else f"rank 0 failed: {name}: {message}")


def _ddp_kwargs() -> dict:
    """Keyword arguments that stop DDP from broadcasting buffers in every forward (torch 2.1 to 2.13+).

    Rank 0's running statistics are the ones evaluated; broadcasting them to the other ranks
    each step would change nothing that is measured and would cost a collective per step.
    """
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def parallel(model: nn.Module, world: World, sync_bn: bool = False) -> nn.Module:
    """The module to train: ``model`` with bnlab.SyncBatchNorm if ``sync_bn``, in DDP if the world has > 1 process.

    ``model`` itself keeps the (converted) layers and the parameters: evaluate it directly (on
    rank 0), not through the wrapper, so that evaluation issues no collective. An optimizer built
    on ``model.parameters()`` before this call keeps working (the conversion keeps the Parameters).

    Args:
        model: the network, already on ``world.device``; changed in place when ``sync_bn``.
        world: this process's World.
        sync_bn: replace every BN layer with bnlab.SyncBatchNorm (needs ``world.size > 1`` to do anything).

    Returns:
        A DistributedDataParallel wrapping ``model`` when ``world.size > 1``, else ``model``.
    """
    if sync_bn:
        import bnlab

        converted = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise ValueError(f"model: expected a network containing BN layers, got a bare {type(model).__name__} layer")
    if world.size <= 1:
        return model
    device_ids = [world.device] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **_ddp_kwargs())
