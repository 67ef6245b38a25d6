"""Parameters and running statistics as views the kernels must not address as plain memory: the
fuzzers' (fuzz_kernels.py, fuzz_triton.py) "vectors" field (fortieth session, when a step-sliced
weight was found read as contiguous by the Triton compositions, and negative-bit vectors on every
CPU path)."""

from __future__ import annotations

import torch

#: The forms of odd_vectors.
ODD_VECTORS = ("strided", "negative", "offset")


def odd_vectors(layer, form: str | None) -> None:
    """Replace the layer's weight, bias, running mean and running variance (those it has) by views
    in ``form`` holding the same values: "strided" (every other element of a 2C buffer), "negative"
    (torch._neg_view, -v in memory), "offset" (contiguous, one element into its storage: a data
    pointer off the usual alignment). None leaves them."""
    if form is None:
        return
    make = {
        "strided": lambda v: torch.stack([v, torch.zeros_like(v)], 1).view(-1)[::2],
        "negative": lambda v: torch._neg_view(-v),
        "offset": lambda v: torch.cat([v.new_zeros(1), v])[1:],
    }[form]
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            if p is not None:
                setattr(layer, name, torch.nn.Parameter(make(p.detach()), requires_grad=p.requires_grad))
        for name in ("running_mean", "running_var"):
            b = getattr(layer, name)
            if b is not None:
                setattr(layer, name, make(b))
