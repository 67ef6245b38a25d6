"""glibc's malloc, told to keep freed memory for the lab's runs.

Why: torch's CPU tensors come from malloc, and glibc hands every freed block above its mmap
threshold back to the system (and trims freed memory at the top of its heap), so the next tensor
of that size faults each of its pages in again, zeroed by the kernel. A ResNet-20 training step at
batch 128 took 12,700-28,000 minor page faults and 274-301 ms with glibc's defaults, 0-768 faults
and 256-290 ms with the thresholds below, on the project's 2-core VM (docs/benchmark_rounds.md,
thirty-seventh session; benchmarks/results/allocator_s37.txt). bnlab's own outputs come from its
pool (bnlab.backends.cpu_pool); the convolutions' do not. Only the lab's command does this, for its own process and the processes it
starts: the library never changes the allocator of a program that imports it.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 << 20
#: freed memory at the top of the heap kept up to this much
TRIM_THRESHOLD = 1 << 30
_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}
_done: list[str] = []


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds in this process (mallopt) and, through the
    environment, in the processes it starts (spawned ranks read it at their start). Does nothing
    where the user set either MALLOC_*_ variable, or off glibc. Returns what holds, for the report;
    called again, it returns the first answer."""
    if _done:
        return _done[0]
    if any(name in os.environ for name in _ENV):
        answer = setting()
    elif not sys.platform.startswith("linux"):
        answer = "the system's default (not glibc)"
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is None:
            answer = "the system's default (no glibc mallopt)"
        elif mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            os.environ.update({name: str(value) for name, value in _ENV.items()})
            answer = (f"glibc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                      f"{TRIM_THRESHOLD >> 30} GiB; set by bnlab run)")  # fmt: skip
        else:
            answer = "glibc's default (mallopt refused the thresholds)"
    _done.append(answer)
    return answer


def setting() -> str:
    """What holds in this process, as keep_freed_memory would say, without changing it."""
    if _done:
        return _done[0]
    chosen = {name: os.environ[name] for name in _ENV if name in os.environ}
    if chosen:
        return "glibc as the environment sets it (" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + ")"
    return "the allocator's default"
