"""Helpers shared by the feature tests (docs/features.md): closeness checks, float64 conversions, and
stepping a bnlab layer beside a torch.nn one."""

from __future__ import annotations

import numpy as np
import torch


def to_np(t) -> np.ndarray:
    """A float64 NumPy copy of a tensor (detached) or array."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).cpu().numpy().copy()  # a copy: buffers change in place
    return np.asarray(t, dtype=np.float64)


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol · max(1, max |expected|); shapes must match; NaNs must coincide."""
    a, e = to_np(actual), to_np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaN positions differ"
    diff = np.where(np.isnan(e), 0.0, np.abs(a - e))
    scale = max(1.0, float(np.nanmax(np.abs(e))))
    err = float(diff.max()) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def assert_train_steps_match(ours, theirs, batches) -> None:
    """Train ``ours`` and ``theirs`` side by side on ``batches`` ((x, dy) pairs): outputs and input
    gradients agree to 2e-4 at every step; then the accumulated weight gradient (2e-4) and every
    state-dict entry (2e-6)."""
    for x, dy in batches:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        y1.backward(dy)
        y2.backward(dy)
        assert_close(y1, y2, 2e-4, "y")
        assert_close(x1.grad, x2.grad, 2e-4, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, 2e-4, "dgamma")
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 2e-6, key)
