"""Calling an autograd Function without torch's Python wrapper when that wrapper has nothing to do.

torch.autograd.Function.apply is a Python wrapper around the C++ _FunctionBase.apply: it binds
setup_context arguments (the backends' Functions have none) and unwraps functorch's dead
wrappers, about 3 us per call, a twentieth of a whole (256, 100) training forward on the CPU and
a tenth of the host time of a GPU one. :func:`direct_apply` calls the C++ apply directly whenever
no functorch transform is active and torch.compile is not tracing (its tracer handles
Function.apply itself). Anything else, or a torch without these hooks, takes the public path.
"""

from __future__ import annotations

from typing import Callable

import torch

_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def c_apply(function: type[torch.autograd.Function]) -> Callable | None:
    """``function.apply`` in C (torch's _FunctionBase.apply, no Python wrapper), or None where torch
    lacks the hook. Only for callers that rule out functorch transforms and tracing themselves."""
    return getattr(super(torch.autograd.Function, function), "apply", None)


def direct_apply(function: type[torch.autograd.Function]) -> Callable:
    """A callable equal to ``function.apply`` that skips the Python wrapper where it is idle."""
    c_apply_ = c_apply(function)
    if c_apply_ is None or _TRANSFORMS_ACTIVE is None or _COMPILING is None:
        return function.apply

    def apply(*args):
        if _TRANSFORMS_ACTIVE() or _COMPILING():
            return function.apply(*args)
        return c_apply_(*args)

    apply.__doc__ = f"{function.__name__}.apply(*args), without the Python wrapper where it is idle."
    return apply
