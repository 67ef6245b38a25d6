"""Backend registry: which implementation of the BN primitives runs for a given tensor.

Backends are tried in order of registration, newest first; the first whose ``supports(x)`` is
true runs. ``set_backend(name)`` (or the environment variable ``BNLAB_BACKEND``) pins one by
name, e.g. to compare a fast path with the portable one; ``None`` returns to automatic choice.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from bnlab.backends import cpu_build
from bnlab.backends.base import Backend
from bnlab.backends.cpu import CpuBackend
from bnlab.backends.portable import PortableBackend
from bnlab.backends.triton_backend import TritonBackend

__all__ = [
    "Backend",
    "register_backend",
    "set_backend",
    "get_backend",
    "select_backend",
    "available_backends",
    "describe",
]

# Most preferred first: the compiled CPU kernels (when they build) for CPU tensors, the Triton
# kernels (when triton imports; imported on the first CUDA tensor) for GPU tensors, else portable.
_REGISTRY: list[Backend] = [CpuBackend(), TritonBackend(), PortableBackend()]
_PINNED: str | None = os.environ.get("BNLAB_BACKEND") or None
# whether _PINNED came from BNLAB_BACKEND (read unchecked at import: a backend of that name may be
# registered after), so that an unknown name is blamed on the variable, not on set_backend's argument
_PINNED_BY_ENVIRONMENT = _PINNED is not None


def register_backend(backend: Backend) -> None:
    """Add a backend, preferred over those registered before it (replacing one of the same name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a bnlab.backends.Backend instance, got {type(backend).__name__}")
    _REGISTRY[:] = [b for b in _REGISTRY if b.name != backend.name]
    _REGISTRY.insert(0, backend)


def available_backends() -> list[str]:
    """Names of the registered backends, most preferred first."""
    return [b.name for b in _REGISTRY]


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    for backend in _REGISTRY:
        if backend.name == name:
            return backend
    raise ValueError(f"name: expected one of the registered backends {available_backends()}, got {name!r}")


def set_backend(name: str | None) -> None:
    """Pin every BN call to the backend ``name``; ``None`` restores the automatic choice."""
    global _PINNED, _PINNED_BY_ENVIRONMENT
    if name is not None:
        get_backend(name)  # validates the name now rather than at the next forward
    _PINNED_BY_ENVIRONMENT = False
    _PINNED = name


def _cpu_backend_in_use() -> CpuBackend | None:
    """The CPU backend when it is the one :func:`select_backend` picks for CPU tensors, else None."""
    backend = get_backend("cpu") if _PINNED == "cpu" else _REGISTRY[0] if _PINNED is None else None
    return backend if isinstance(backend, CpuBackend) else None


def cpu_eval_entry():
    """The compiled whole-call eval (:meth:`CpuBackend.eval_entry`) when the CPU backend is in use, else None."""
    backend = _cpu_backend_in_use()
    return backend.eval_entry() if backend is not None else None


def registered_cpu_backend() -> CpuBackend | None:
    """The CPU backend in the registry, whether or not it is the one chosen now (None if there is none)."""
    return next((b for b in _REGISTRY if isinstance(b, CpuBackend)), None)


def cpu_train_entry():
    """The compiled whole training call (:meth:`CpuBackend.train_entry`) when the CPU backend is in use, else None."""
    backend = _cpu_backend_in_use()
    return backend.train_entry() if backend is not None else None


def select_backend(x: Tensor) -> Backend:
    """The backend that runs for input x: the pinned one if set, else the first that supports x."""
    if _PINNED is not None:
        try:
            backend = get_backend(_PINNED)
        except ValueError:
            if not _PINNED_BY_ENVIRONMENT:
                raise
            raise ValueError(f"BNLAB_BACKEND: expected one of the registered backends {available_backends()}, "
                             f"got {_PINNED!r}") from None
        if not backend.supports(x):
            raise ValueError(
                f"input: the pinned backend {_PINNED!r} does not support a {x.dtype} tensor on {x.device} "
                f"of shape {tuple(x.shape)}; call bnlab.set_backend(None) for the automatic choice"
            )
        return backend
    for backend in _REGISTRY:
        if backend.supports(x):
            return backend
    raise AssertionError("unreachable: the portable backend supports every tensor")


def describe() -> str:
    """Which backend runs where, in words (``bnlab selfcheck`` prints it): the backend a CPU tensor
    gets and whether the compiled kernels built (:func:`bnlab.backends.cpu_build.status`), and for
    GPU tensors whether triton imports and CUDA is there. Loads the CPU kernels if not loaded."""
    pinned = f" (pinned by set_backend or BNLAB_BACKEND: {_PINNED!r})" if _PINNED is not None else ""
    try:
        cpu = select_backend(torch.empty(2, 1)).name
    except ValueError:  # a pinned backend that takes no CPU tensors
        cpu = "none"
    lines = [f"backend for CPU tensors: {cpu}{pinned}", cpu_build.status()]
    triton = get_backend("triton") if "triton" in available_backends() else None
    if isinstance(triton, TritonBackend):
        ops = triton.ops()
        gpu = "a CUDA device is present" if torch.cuda.is_available() else "no CUDA device"
        lines.append(f"Triton kernels: {'importable' if ops is not None else f'unavailable ({triton.error})'}, {gpu}")
    return "\n".join(lines)
