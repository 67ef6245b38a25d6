"""How the CPU backend's Python path hands tensors to the kernels: the pointer and dtype code of a
(C,) parameter or statistic (a copy where the kernels cannot take it as it is), which vectors the
kernels may update in place, float64 statistics, and a gradient in the input's layout.

The kernels read memory by pointer, so a vector in other strides, a view with torch's negative bit
(its memory holds -v) and a tensor subclass that handles its operations in Python
(bnlab._memory) are copied, refused or left to torch's operators here. The common case, a plain
vector, is answered by one call into the extension module (``bn_plain_vector``) once it is set up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab._memory import memory_readable, readable_vector
from bnlab.backends import cpu_pool
from bnlab.backends.views import addressed_like

#: The kernels' dtype codes (their ``DType`` order).
_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_F64 = torch.float64


def _no_plain_vector_check(v: Tensor) -> None:
    return None


#: The extension module's ``bn_plain_vector`` once its whole calls are set up (CpuBackend.eval_entry):
#: (pointer, dtype code) of a plain (C,) CPU vector in one call, else None (then the checks below).
_plain_vector = _no_plain_vector_check


def use_compiled_vector_check(check) -> None:
    """Let :func:`param` and :func:`is_plain_vector` ask ``check`` (bn_plain_vector) first; None: never."""
    global _plain_vector
    _plain_vector = check or _no_plain_vector_check


def compiled_vector_check() -> bool:
    """Whether the compiled check is in use."""
    return _plain_vector is not _no_plain_vector_check


def param(v: Tensor | None) -> tuple[int, int, Tensor | None]:
    """(pointer, dtype code, owner) of an optional (C,) parameter or buffer; (0, 0, None) for None.

    The caller keeps ``owner`` alive during the kernel call: it is a copy when v has a stride or
    torch's negative bit (whose memory holds -v: the kernels read memory as it is).
    """
    if v is None:
        return 0, 0, None
    plain = _plain_vector(v)
    if plain is not None:
        return plain[0], plain[1], v
    readable_vector(v)
    if v.stride(0) != 1 or v.is_neg():
        v = v.resolve_neg().contiguous()
    return v.data_ptr(), _CODE[v.dtype], v


def is_plain_vector(v: Tensor | None) -> bool:
    """None, or a CPU (C,) floating tensor with unit stride that the kernels may read and write directly
    (not a view with torch's negative bit, whose memory holds -v, nor a tensor subclass that handles
    its operations in Python: bnlab._memory).

    (Callers have validated the shape and the floating dtype.)
    """
    if v is None or _plain_vector(v) is not None:
        return True
    return v.is_cpu and v.stride(0) == 1 and not v.is_neg() and memory_readable(v)


def _f64(v: Tensor) -> Tensor:
    """A float64 contiguous (C,) statistic (the forward's own outputs already are)."""
    if v.dtype != _F64 or not v.is_contiguous() or v.is_neg():
        v = v.resolve_neg().to(_F64).contiguous()
    return v


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with x's dtype and strides: a gradient may arrive in another memory format (or with
    torch's negative bit, whose memory holds -t: copy_ resolves it)."""
    if addressed_like(t, x):
        return t
    return cpu_pool.empty_like(x).copy_(t)
