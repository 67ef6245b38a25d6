"""How the CPU kernels see a tensor: its layout, and a copy in one of their layouts when it has none.

The kernels (cpu_kernels.cpp) address memory of two layouts, NCL rows of one channel's values
and NLC rows of C channels (:func:`layout_of`). A view in other strides is copied into contiguous
memory (:func:`kernel_input`) and the outputs computed on the copy are laid out as the view's own
would be (``views.laid_out_as``); a permuted contiguous view's elementwise passes skip the copy
(``views.dense_permutation``).
"""

from __future__ import annotations

from torch import Tensor

from bnlab.backends import views
from bnlab.backends.views import dense_permutation, laid_out_as  # noqa: F401  (re-exported)

_NCL, _NLC = 0, 1


def layout_of(x: Tensor) -> tuple[int, int, int, int] | None:
    """(layout, N, C, L) of x for the kernels, or None if its strides are neither of the two layouts.

    NCL: contiguous (N, C, *) with L = prod(spatial) > 1, or channels outermost in memory (a
    transposed (C, N, *) tensor), seen as (1, C, N*L). NLC: rows of C contiguous channels, N*L
    rows: (N, C) inputs, contiguous inputs with L = 1, and channels-last memory.
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    rows = x.numel() // c if c else 0
    if x.is_contiguous():
        length = rows // n if n else 0
        return (_NLC, rows, c, 1) if length == 1 else (_NCL, n, c, length)
    if x.stride(1) == 1 and x.movedim(1, -1).is_contiguous():
        return (_NLC, rows, c, 1)
    if x.movedim(1, 0).is_contiguous():
        # Channels outermost (e.g. h.t() of a feature-major (C, N) activation): each channel's
        # values are contiguous, which is NCL with one batch row of all the values.
        return (_NCL, 1, c, rows)
    return None


def fits(x: Tensor) -> bool:
    """Whether the kernels take x as it is: non-empty, in one of the two layouts, without torch's
    negative bit (whose memory holds -x; :func:`kernel_input` takes the resolved copy)."""
    return x.numel() > 0 and not x.is_neg() and layout_of(x) is not None


def kernel_input(x: Tensor, elementwise: bool = False) -> tuple[Tensor, tuple[int, int, int, int]] | None:
    """(x, its layout_of) if the kernels take x; for a non-empty x in other strides, a contiguous
    copy of it and that copy's layout; None if x is empty, and for an ``elementwise`` pass (eval,
    normalize, the input gradient from given sums) if x is a permuted contiguous tensor
    (:func:`dense_permutation`), which the portable implementation then takes as it is
    (``views.kernel_input``, the rule the Triton backend follows too).

    Why copy rather than hand such views (an expanded batch, a strided slice, a permuted tensor) to
    the portable implementation: its float32 sums, on an expanded batch whose channels are then
    constant, let 1/sqrt(eps) magnify their rounding (dx 2.4e-4-1e-3 off the float64 reference in
    the differential fuzzer, benchmarks/fuzz_kernels.py); the kernels sum in float64, and a copy
    costs less than the portable path's passes (docs/benchmark_rounds.md, twenty-fifth session).
    torch.nn's CPU kernels copy such inputs too.
    """
    return views.kernel_input(x, layout_of, elementwise)
