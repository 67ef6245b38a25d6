"""What a benchmark result depends on besides the code: machine, allocator, threads, versions.

Recorded with every result (docs/benchmarks.md explains why each item matters: glibc's mmap
threshold alone changes the time of a 67 MB output by 2-5x).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bnlab.lab.speed_timing import cpu_model


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None




#: The vector extensions the CPU kernels' build (-march=native) chooses between. Recorded beside
#: the model name because two machines named "AMD EPYC" differed in them: the ninth session's had
#: AVX2 only, the sixteenth and seventeenth sessions' AVX-512 (docs/benchmark_rounds.md, seventeenth session).
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_fp16")


def cpu_identity(cpuinfo: str) -> dict:
    """Vendor, family/model and kernel-relevant flags of the first processor listed in the text of
    /proc/cpuinfo: {"cpu_id": "AuthenticAMD family 25 model 17", "cpu_flags": "avx2 fma ..."}
    (KERNEL_FLAGS present, in that order). Fields the text lacks are left out ({} for "")."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    out = {}
    if {"vendor_id", "cpu family", "model"} <= fields.keys():
        out["cpu_id"] = f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}"
    if "flags" in fields:
        present = set(fields["flags"].split())
        out["cpu_flags"] = " ".join(f for f in KERNEL_FLAGS if f in present)
    return out


def allocator_settings() -> dict:
    """glibc's settings that decide whether freed memory goes back to the system, as this process
    has them. Allocations above M_MMAP_THRESHOLD (dynamic, at most 32 MiB) are fresh mmaps, whose
    pages fault in on first write, and freed memory beyond M_TRIM_THRESHOLD at the heap's top is
    returned; a variable unset means glibc's default behaviour."""
    return {
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "unset (glibc default, dynamic up to 32 MiB)"),
        "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "unset (glibc default)"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset (glibc default, dynamic)"),
    }


def environment(device: str) -> dict:
    """A JSON-able description of the machine and the settings that change timings."""
    import bnlab
    from bnlab.backends import cpu_build

    cpu_build.load()  # report which kernels run (and why not, if they do not)

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "bnlab": bnlab.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        **cpu_identity(_read("/proc/cpuinfo") or ""),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **allocator_settings(),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "bnlab_cpu_kernels": cpu_build.library_path() or cpu_build.load_error(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def first_call_seconds() -> dict:
    """Time to compile bnlab's CPU kernels in a fresh process with an empty cache, and to load them cached.

    Returns {"compile_s": ..., "cached_load_s": ...} (None when the kernels cannot be built).
    """
    code = (
        "import time, torch; t = time.perf_counter(); from bnlab.backends import cpu_build; "
        "lib = cpu_build.load(); print(time.perf_counter() - t if lib is not None else -1)"
    )
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, BNLAB_CACHE_DIR=cache)
        for key in ("compile_s", "cached_load_s"):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            value = float(proc.stdout.strip() or -1) if proc.returncode == 0 else -1
            out[key] = None if value < 0 else round(value, 3)
            out[key.replace("_s", "_process_s")] = round(time.perf_counter() - start, 3)
    return out
