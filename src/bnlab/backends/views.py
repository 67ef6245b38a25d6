"""Views in strides bnlab's kernels do not address (expanded, strided, permuted): the rules both
kernel backends (CPU, Triton) follow when they run such a view on a contiguous copy.

:func:`kernel_input` makes the copy where a backend's plan declines a view; :func:`dense_permutation`
tells the views whose elementwise passes the portable implementation takes as they are (copying
them in and back out cost more); :func:`laid_out_as` gives an output
computed on the copy the strides of ``torch.empty_like(view)``, which the portable path gave such
views and bnlab's torch.compile operators promise.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor

P = TypeVar("P")


def dense_permutation(x: Tensor) -> bool:
    """Whether x's values fill their span of storage without gaps or overlaps: a permuted
    contiguous tensor (no stride 0 along a dimension of several values, no slice's gaps).

    The elementwise passes (eval, normalize, the input gradient from given sums) leave such a view
    to the portable implementation, without copies: copied in and laid back out as permuted, a
    (32, 64, 56, 56).transpose(2, 3) eval took 7.5 ms against its 2.9 (strided_inputs.py; CPU kernels).
    """
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_input(x: Tensor, plan: Callable[[Tensor], P | None], elementwise: bool = False) -> tuple[Tensor, P] | None:
    """(x, plan(x)) if a backend's kernels take x as it is; for a non-empty view they do not take,
    its contiguous copy and the copy's plan; None for an empty x, for a copy the kernels do not
    take either, and for an ``elementwise`` pass (eval, normalize, the input gradient from given
    sums) over a :func:`dense_permutation`, which the portable implementation takes as it is.
    ``plan`` is the backend's own test: ``cpu_layout.layout_of``, ``TritonBackend.plan``."""
    if x.numel() == 0:
        return None
    if x.is_neg():
        # A view with torch's negative bit (torch._neg_view, resolved lazily by torch's ops) has -x
        # in its memory, which the kernels would read as it is: they take the resolved copy.
        x = x.resolve_neg()
    found = plan(x)
    if found is not None:
        return x, found
    if elementwise and dense_permutation(x):
        return None
    copy = x.contiguous()
    found = plan(copy)
    return None if found is None else (copy, found)


def addressed_like(t: Tensor, x: Tensor) -> bool:
    """Whether a kernel may read t (a gradient, a residual) at x's offsets as it is: x's dtype and
    strides, and no negative bit (whose memory holds -t). Otherwise both backends copy t into
    x's layout first (their ``_like``)."""
    return t.dtype == x.dtype and t.stride() == x.stride() and not t.is_neg()


def laid_out_as(t: Tensor | None, view: Tensor, ran_on: Tensor) -> Tensor | None:
    """t, an output the kernels computed on ``ran_on`` (``view`` itself, or its contiguous copy,
    as :func:`kernel_input` makes it), in the strides of
    ``torch.empty_like(view)``: those the portable path gave such views, and those bnlab's
    torch.compile operators promise (custom_ops). A copy only for views whose empty_like keeps a
    permutation; on the autograd graph when t is."""
    if t is None or ran_on is view:
        return t
    want = torch.empty_like(view, device="meta").stride()
    return t if t.stride() == want else torch.empty_like(view).copy_(t)
