"""The collectives of SyncBatchNorm, and a counter that proves how many a step issues.

SyncBatchNorm inserts exactly one collective after each reduce phase (docs/math.md §2 and §3):

- forward: :func:`gather_moments` all-gathers every rank's packed ``(count, mean, M2)`` and
  merges the rows with Chan's rule (``bnlab.stats.merge_stacked``), so uneven batches and
  empty ranks need no special case and no second collective for the counts;
- backward: :func:`all_reduce_grad_sums` sums ``(Σdy, Σdy·x̂)`` over the ranks.

Everything here stays on the statistics' device: no ``.item()``, no host round trip, so on CUDA
the only waits are those of the collectives themselves.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab.stats import Moments, merge_stacked

__all__ = [
    "group_size", "group_name", "group_named", "gather_moments", "all_reduce_grad_sums", "count_collectives",
    "COLLECTIVE_NAMES",
]  # fmt: skip


def group_size(process_group=None) -> int:
    """Number of processes that SyncBatchNorm synchronises over; 1 when torch.distributed is not in use.

    Args:
        process_group: a ``torch.distributed`` process group, or None for the default (world) group.

    Returns:
        The group's size, or 1 when torch.distributed is unavailable or no process group is initialised.

    Raises:
        ValueError: this process is not a member of ``process_group``: it cannot join its collectives.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    size = dist.get_world_size(process_group)
    if size < 0:  # torch's answer for a process outside the group
        raise ValueError(
            f"process_group: expected a group that contains this process (global rank {dist.get_rank()}), "
            f"got a group it is not a member of; build the layer with the group of this rank's peers"
        )
    return size


def group_name(process_group=None) -> str:
    """The name torch.distributed gives ``process_group`` (None: the default, world group).

    Operators take a group by this name (a ProcessGroup object cannot be an operator argument),
    as torch's functional collectives do; :func:`group_named` gives the group back.
    TorchDynamo reads it as a constant while tracing.

    Raises:
        TypeError: ``process_group`` is neither None nor a ProcessGroup.
        ValueError: ``process_group`` is None and no process group is initialised.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "process_group: None names the default group, but torch.distributed has no process group "
                "initialised; call torch.distributed.init_process_group first"
            )
        return dist.distributed_c10d._get_default_group().group_name
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group: expected a torch.distributed ProcessGroup or None, got {type(process_group).__name__}"
        )
    return process_group.group_name


def group_named(name: str):
    """The process group that :func:`group_name` named ``name``.

    Raises:
        ValueError: no process group of this process is registered under ``name``.
    """
    try:
        return dist.distributed_c10d._resolve_process_group(name)
    except RuntimeError as error:
        raise ValueError(
            f"name: expected the name of a process group of this process (bnlab.distributed.group_name), "
            f"got {name!r}: {error}"
        ) from error


def gather_moments(local: Moments, process_group=None) -> tuple[Moments, Tensor]:
    """Merge every rank's statistics with one all_gather: the forward collective of SyncBatchNorm.

    Each rank contributes one float64 row ``[count, mean (C), M2 (C)]``; counts may differ between
    ranks, and may be 0. Counts travel as float64, exact up to 2**53 values per channel.

    Args:
        local: this rank's Moments (count an int or a 0-dim tensor; mean, m2 float64 (C,)).
        process_group: the group to merge over (None: the world).

    Returns:
        ``(merged, counts)``: merged Moments whose count is a 0-dim float64 tensor on the
        statistics' device, and the per-rank counts (W,) in group-rank order.

    Shape: local.mean, local.m2 (C,); merged.mean, merged.m2 (C,); counts (W,).
    """
    mean = local.mean
    channels = mean.numel()
    if isinstance(local.count, Tensor):
        count = local.count.reshape(1).to(torch.float64)
    else:
        count = mean.new_full((1,), float(local.count))  # a fill kernel: no host-to-device copy
    row = torch.cat([count, mean, local.m2])  # (2C + 1,)
    rows = [torch.empty_like(row) for _ in range(group_size(process_group))]
    dist.all_gather(rows, row, group=process_group)
    table = torch.stack(rows)  # (W, 2C + 1)
    counts = table[:, 0]
    merged = merge_stacked(counts, table[:, 1 : 1 + channels], table[:, 1 + channels :])
    return merged, counts


def all_reduce_grad_sums(sum_dy: Tensor, sum_dy_xhat: Tensor, process_group=None) -> tuple[Tensor, Tensor]:
    """Sum the backward's per-channel (Σdy, Σdy·x̂) over the ranks with one all_reduce.

    Args:
        sum_dy, sum_dy_xhat: this rank's float64 (C,) sums (from ``Backend.grad_sums``).
        process_group: the group to sum over (None: the world).

    Returns:
        The global (Σdy, Σdy·x̂), float64 (C,) each; the inputs are left unchanged.
    """
    channels = sum_dy.numel()
    packed = torch.cat([sum_dy, sum_dy_xhat])  # (2C,): one message instead of two
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    return packed[:channels], packed[channels:]


#: The torch.distributed functions :func:`count_collectives` watches (those present in this torch).
COLLECTIVE_NAMES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list",
    "all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_coalesced", "all_gather_object",
    "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list",
)  # fmt: skip


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the torch.distributed collectives called from Python inside the ``with`` block.

    Every function named in :data:`COLLECTIVE_NAMES` is wrapped, both on ``torch.distributed`` and
    on ``torch.distributed.distributed_c10d`` (where torch's own wrappers call each other); a
    call made from inside another counted call is not counted again, so
    ``all_gather_into_tensor`` counts once even where torch implements it with another function.
    Collectives issued from C++ (DDP's gradient buckets) are not seen: this counts what
    Python code such as bnlab issues.

    Returns:
        A Counter from function name to number of calls, filled while the block runs.

    Example::

        with count_collectives() as calls:
            layer(x).sum().backward()
        assert calls == {"all_gather": 1, "all_reduce": 1}
    """
    calls: Counter = Counter()
    nesting = threading.local()  # per thread: autograd may run a backward on another thread
    modules = (dist, dist.distributed_c10d)
    saved = []

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(nesting, "depth", 0)
            if depth == 0:
                calls[name] += 1
            nesting.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                nesting.depth = depth

        return counted

    for name in COLLECTIVE_NAMES:
        original = getattr(dist.distributed_c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        counted = wrap(name, original)
        for module in modules:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, counted)
    try:
        yield calls
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)
