"""`bnlab selfcheck`: bnlab's layers against torch.nn's and the float64 reference, on random data.

A one-command answer to "does bnlab compute the same thing as PyTorch here?": for each layer
class, dtype and mode it runs the same input through both, and prints the largest differences
in outputs, input gradients, parameter gradients and running statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab import reference

_CASES = [
    ("BatchNorm1d", (64, 100)),
    ("BatchNorm1d", (16, 8, 33)),
    ("BatchNorm2d", (8, 16, 14, 14)),
    ("BatchNorm3d", (4, 6, 5, 7, 3)),
]
# Tolerances relative to the scale of each quantity: float64 agrees to rounding, float32 to 2e-4.
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


@dataclass
class CheckRow:
    """One line of the selfcheck table: the largest relative differences for one case."""

    layer: str
    shape: tuple
    dtype: str
    output: float
    grad_input: float
    grad_params: float
    running_stats: float
    vs_reference: float
    tolerance: float

    @property
    def ok(self) -> bool:
        worst = _worst(self.output, self.grad_input, self.grad_params, self.running_stats, self.vs_reference)
        return worst <= self.tolerance  # (False for NaN)


def _worst(*values: float) -> float:
    """The largest of ``values``, NaN if any is NaN: Python's max drops a NaN that is not first,
    and NaN outputs had passed the check as 0.0."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale max(1, max |b|)."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / max(1.0, float(b64.abs().max())))


def _check_case(layer: str, shape: tuple, dtype: torch.dtype, steps: int, seed: int) -> CheckRow:
    gen = torch.Generator().manual_seed(seed)
    ours = getattr(bnlab, layer)(shape[1], dtype=dtype)
    theirs = getattr(nn, layer)(shape[1], dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(shape[1], generator=gen, dtype=dtype) + 0.5)
        ours.bias.copy_(torch.randn(shape[1], generator=gen, dtype=dtype))
    theirs.load_state_dict(ours.state_dict())
    diffs = {"output": 0.0, "grad_input": 0.0, "grad_params": 0.0, "running_stats": 0.0, "vs_reference": 0.0}
    for _ in range(steps):
        x = (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        ours.zero_grad()
        theirs.zero_grad()
        y, y2 = ours(x), theirs(x2)
        y.backward(dy)
        y2.backward(dy)
        ref_y, cache = reference.forward_train(x.detach().double().numpy(), ours.weight.detach().double().numpy(),
                                               ours.bias.detach().double().numpy(), ours.eps)
        ref_dx, _, _ = reference.backward(dy.double().numpy(), cache)
        diffs["output"] = _worst(diffs["output"], _rel(y, y2))
        diffs["grad_input"] = _worst(diffs["grad_input"], _rel(x.grad, x2.grad))
        diffs["grad_params"] = _worst(diffs["grad_params"], _rel(ours.weight.grad, theirs.weight.grad),
                                      _rel(ours.bias.grad, theirs.bias.grad))
        # the counter too: a layer that counted no batch had passed
        counted = 0.0 if int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) else math.inf
        diffs["running_stats"] = _worst(diffs["running_stats"], _rel(ours.running_mean, theirs.running_mean),
                                        _rel(ours.running_var, theirs.running_var), counted)
        diffs["vs_reference"] = _worst(diffs["vs_reference"], _rel(y, torch.from_numpy(ref_y)),
                                       _rel(x.grad, torch.from_numpy(np.asarray(ref_dx))))
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, generator=gen, dtype=dtype)
    diffs["output"] = _worst(diffs["output"], _rel(ours(x), theirs(x)))
    return CheckRow(layer, shape, str(dtype).replace("torch.", ""), tolerance=_TOLERANCE[dtype], **diffs)


def run_selfcheck(steps: int = 3, seed: int = 0) -> list[CheckRow]:
    """Compare bnlab with torch.nn over every case and dtype; returns one row per case. ``steps``
    training steps (at least 1: with none, nothing would be compared) precede the eval check."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int (training steps per case), got {steps!r}")
    return [
        _check_case(layer, shape, dtype, steps, seed)
        for layer, shape in _CASES
        for dtype in (torch.float64, torch.float32)
    ]


def format_rows(rows: list[CheckRow]) -> str:
    """The selfcheck table as text, one line per case, with a verdict per line and overall."""
    header = f"{'layer':<12} {'shape':<18} {'dtype':<8} {'output':>9} {'grad x':>9} {'grad γ,β':>9} {'running':>9} {'vs ref':>9}  ok"
    lines = [
        "bnlab vs torch.nn (train steps, then eval) and vs the float64 reference:",
        "largest difference relative to max(1, |value|)",
        header,
        "-" * len(header),
    ]
    for r in rows:
        lines.append(
            f"{r.layer:<12} {str(r.shape):<18} {r.dtype:<8} {r.output:9.1e} {r.grad_input:9.1e} "
            f"{r.grad_params:9.1e} {r.running_stats:9.1e} {r.vs_reference:9.1e}  {'yes' if r.ok else 'NO'}"
        )
    verdict = "all within tolerance" if all(r.ok for r in rows) else "SOME CASES EXCEED TOLERANCE"
    lines.append(f"{verdict} (float64: 1e-9, float32: 2e-4)")
    return "\n".join(lines)
