"""Which tensors bnlab's compiled kernels (CPU, Triton) may address by pointer.

The kernels read and write a tensor's memory as torch lays it out. That memory is there, and
holds the tensor's values, only for a tensor whose operations torch runs itself: torch.Tensor,
nn.Parameter, or a subclass that leaves ``__torch_dispatch__`` as it is. A subclass that handles
its operations in Python (FakeTensor, FunctionalTensor, DTensor, a user's wrapper subclass) may
have no memory, or memory that means something else: a FakeTensor's data pointer is 0, and
kernels reading it crashed the process (fortieth session). Such tensors take torch's operators
instead (the portable backend), as torch.nn's would.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["memory_readable", "readable_vector"]

_TORCH_DISPATCH = Tensor.__torch_dispatch__


def memory_readable(t: Tensor) -> bool:
    """Whether t's memory holds its values for the kernels to read: a tensor whose class leaves
    ``__torch_dispatch__`` to torch (one attribute lookup, about 50 ns)."""
    return type(t).__torch_dispatch__ is _TORCH_DISPATCH


def readable_vector(v: Tensor | None) -> Tensor | None:
    """v (a (C,) parameter or statistic of a call whose input the kernels take, or None) if the
    kernels may read it, else a TypeError naming its type (torch's own operators refuse such a mix
    too: a FakeTensor's with real inputs, a DTensor's with plain ones)."""
    if v is not None and not memory_readable(v):
        raise TypeError(
            f"weight, bias, running_mean, running_var: expected plain tensors like the input, got a "
            f"{type(v).__name__} (a tensor subclass with its own __torch_dispatch__); make the input "
            "the same kind of tensor"
        )
    return v
