"""Helpers shared by the feature tests (docs/features.md): closeness checks and float64 conversions."""

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
