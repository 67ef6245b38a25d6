"""Reused memory for the CPU kernels' large outputs (the pool in cpu_kernels_pool.inc).

glibc gives every allocation above its mmap threshold (at most 32 MiB) fresh pages, which the
operating system zeroes before the kernel can write them, and returns freed memory at the top of
its heap to the system: on a (256, 64, 32, 32) float32 input that doubled the cost of the forward
pass. Outputs of :data:`POOL_MIN_BYTES` or more are
therefore taken from a pool of blocks that earlier outputs gave back when they died, and handed to
torch without a copy through DLPack. The pool keeps at most a limit of idle bytes
(``BNLAB_CPU_CACHE_BYTES``, default an eighth of physical memory and at most 4 GiB); blocks in use
are the tensors' own and count against nothing. Where the compiled module is unavailable (the
ctypes build, another OS), outputs come from torch's allocator as before.

Public: :func:`empty_cpu_cache`, :func:`cpu_cache_info`, :func:`set_cpu_cache_limit` (also as
``bnlab.empty_cpu_cache`` and friends), the CPU counterparts of ``torch.cuda.empty_cache`` and
``torch.cuda.memory_stats``.
"""

from __future__ import annotations


import torch
from torch import Tensor
from torch.utils.dlpack import from_dlpack

from bnlab.backends import cpu_build, cpu_environment

__all__ = ["POOL_MIN_BYTES", "empty_like", "empty_cpu_cache", "cpu_cache_info", "set_cpu_cache_limit"]

#: Outputs at least this large come from the pool (it rounds sizes up to 64 KiB, and from 2 MiB up
#: to whole 2 MiB huge pages). Between 512 KiB and 4 MiB malloc's memory, too, came back fresh
#: whenever other work ran between two BN calls: a training step of (8192, 100) took 0.62-0.68
#: and (2048, 100) 0.82-0.84 of the time from the pool, interleaved with torch.nn's steps;
#: smaller outputs gained nothing (benchmarks/pool_threshold.py, results/pool_threshold.txt).
POOL_MIN_BYTES = 512 << 10

_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# A limit of 0 turns the pool off altogether: outputs come from torch's allocator again (so that,
# e.g., their storage can grow with resize_, which torch refuses for memory it did not allocate).
# (A malformed value is an error at the first kernel use: cpu_environment.check_environment.)
_state = {"enabled": cpu_environment.env_bytes("BNLAB_CPU_CACHE_BYTES") != 0}


def _pool():
    """The compiled module when it has the pool, else None."""
    lib = cpu_build.load()
    return lib if lib is not None and hasattr(lib, "bn_empty") else None


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor with x's shape, strides and dtype: pooled memory when x is large.

    x: a dense CPU tensor (its strides a permutation of contiguous ones, as every layout the
    kernels take).
    """
    nbytes = x.numel() * x.element_size()
    if nbytes >= POOL_MIN_BYTES and _state["enabled"]:
        lib = _pool()
        if lib is not None:
            capsule = lib.bn_empty(tuple(x.shape), x.stride(), _CODE[x.dtype], nbytes)
            if capsule is not None:
                return from_capsule(capsule)
    return torch.empty_like(x)


#: The tensor of a DLPack capsule. torch.utils.dlpack.from_dlpack first asks whether its argument
#: has ``__dlpack__`` (a capsule has not), then calls this.
from_capsule = getattr(torch._C, "_from_dlpack", from_dlpack)


def pool_state() -> dict:
    """The pool's switch, ``{"enabled": bool}``, which the compiled eval call reads on every call."""
    return _state


def empty_cpu_cache() -> None:
    """Give the idle pooled output buffers back to the operating system (tensors in use keep theirs)."""
    lib = _pool()
    if lib is not None:
        lib.bn_pool_release()


def cpu_cache_info() -> dict[str, int]:
    """The pool's state: idle_bytes, idle_blocks, hits and misses (outputs served from an idle
    block or freshly mapped, since the process started) and limit (most idle bytes kept).
    All zero when the pool is unavailable."""
    lib = _pool()
    values = lib.bn_pool_info() if lib is not None else (0, 0, 0, 0, 0)
    return dict(zip(("idle_bytes", "idle_blocks", "hits", "misses", "limit"), values))


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` idle bytes in the pool, trimming it now; 0 turns the pool off (outputs
    then come from torch's allocator, as with ``BNLAB_CPU_CACHE_BYTES=0``)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes: expected a non-negative int, got {nbytes!r}")
    _state["enabled"] = nbytes > 0
    lib = _pool()
    if lib is not None:
        lib.bn_pool_set_limit(nbytes)
