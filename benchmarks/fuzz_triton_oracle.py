"""The oracles of benchmarks/fuzz_triton.py: a case's input values and layouts, and the checks
of results against the float64 reference and torch.nn (tolerances: bnlab.reference.TOLERANCE)."""

from __future__ import annotations

import math

import numpy as np
import torch

from bnlab import reference as ref
from fuzz_triton_cases import DTYPES

TOL = {getattr(torch, name): tol for name, tol in ref.TOLERANCE.items()}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    if layout == "cl":  # channels innermost, any rank
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "cf":  # channels outermost in memory (a transposed (C, N, *) tensor)
        return x.movedim(1, 0).contiguous().movedim(0, 1)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


def _per_channel(v: torch.Tensor, nd: int) -> torch.Tensor:
    return v.view([1, -1] + [1] * (nd - 2))


def make_x(spec: dict, gen: torch.Generator) -> torch.Tensor:
    """The input, in float64 (before the cast to the case's dtype), by the case's kind of values."""
    shape, c, nd = spec["shape"], spec["shape"][1], len(spec["shape"])
    dtype = DTYPES[spec["dtype"]]
    kind = spec["values"]
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    u = torch.rand(2, c, generator=gen, dtype=torch.float64)
    if kind == "large_mean":
        x = 1000.0 + 0.01 * z
    elif kind == "huge":
        x = 1e18 + 3e17 * z
    elif kind == "tiny":
        x = _per_channel(10 ** (-6 + 3 * u[0]), nd) * z
    elif kind == "wide":
        limit = 4.0 if dtype in (torch.float16,) else 4.5 if dtype is torch.bfloat16 else 6.0
        mean = torch.sign(u[0] - 0.5) * 10 ** (-3 + (limit + 3) * u[1])
        std = 10 ** (-4 + 6 * torch.rand(c, generator=gen, dtype=torch.float64))
        x = _per_channel(mean, nd) + _per_channel(std, nd) * z
        if dtype is torch.float16:
            x = x.clamp(-6e4, 6e4)
    else:
        x = _per_channel(4 * u[0] - 2, nd) + _per_channel(10 ** (2 * u[1] - 1), nd) * z
    if kind == "constant":
        which = torch.rand(c, generator=gen) < 0.5
        if not bool(which.any()):
            which[int(torch.randint(c, (1,), generator=gen))] = True
        value = (torch.randn(c, generator=gen, dtype=torch.float64) * 10).to(dtype).to(torch.float64)
        x = torch.where(_per_channel(which, nd), _per_channel(value, nd).expand_as(x), x)
    if kind == "nonfinite":
        flat = x.reshape(-1)
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            i = int(torch.randint(flat.numel(), (1,), generator=gen))
            flat[i] = [float("nan"), float("inf"), float("-inf")][int(torch.randint(3, (1,), generator=gen))]
        x = flat.view(shape)
    return x


def _cast_layout(t64: torch.Tensor, dtype, layout: str) -> torch.Tensor:
    """A new tensor (never t64 itself, nor one sharing its storage) of dtype in the layout."""
    return to_layout(t64.to(dtype, copy=True), layout)


def _np(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (never a view of a buffer the layers update in place)."""
    return t.detach().resolve_neg().double().cpu().numpy().copy()


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------


def compare(actual, expected) -> tuple[float, str]:
    """(error, detail): max |a - e| / max(1, max |e|) over finite expected values, inf when NaN or
    infinite values sit in different places or differ in sign."""
    a = torch.as_tensor(actual.detach() if isinstance(actual, torch.Tensor) else np.asarray(actual)).double().cpu()
    e = expected.detach() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    e = torch.as_tensor(e).double().cpu()
    if a.shape != e.shape:
        return math.inf, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0, ""
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if bool((nan_a != nan_e).any()):
        where = torch.nonzero(nan_a != nan_e)
        return math.inf, (f"NaN in different places: {int((nan_a & ~nan_e).sum())} NaN where expected is not, "
                          f"{int((nan_e & ~nan_a).sum())} expected NaN missing; first at {where[0].tolist()}: "
                          f"got {a[tuple(where[0])].item()!r}, expected {e[tuple(where[0])].item()!r}")  # fmt: skip
    inf_e = torch.isinf(e)
    inf_a = torch.isinf(a)
    if bool((inf_a != inf_e).any()) or bool((a[inf_e] != e[inf_e]).any()):
        where = torch.nonzero((inf_a != inf_e) | (inf_e & (a != e)))
        return math.inf, (f"inf in different places; first at {where[0].tolist()}: got {a[tuple(where[0])].item()!r}, "
                          f"expected {e[tuple(where[0])].item()!r}")  # fmt: skip
    finite = torch.isfinite(e)
    if not bool(finite.any()):
        return 0.0, ""
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    scale = max(1.0, float(e[finite].abs().max()))
    err = float(diff.max()) / scale
    i = int(diff.reshape(-1).argmax())
    idx = list(np.unravel_index(i, tuple(a.shape))) if a.dim() else []
    detail = f"max at {[int(v) for v in idx]}: got {a.reshape(-1)[i].item()!r}, expected {e.reshape(-1)[i].item()!r}"
    return err, detail


class Checker:
    def __init__(self):
        self.failures: list[dict] = []
        self.checks = 0
        self.skipped = 0
        self.torch_off = 0

    def close(self, what: str, actual, expected, tol: float, limit: float | None = None):
        """actual within tol of expected (see compare); skipped when expected's finite values pass
        ``limit`` (the output dtype's overflow, where any result is as good as another)."""
        self.checks += 1
        if limit is not None and expected is not None:
            e = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected.detach())
            e = e.double()
            if bool((e[torch.isfinite(e)].abs() > limit).any()):
                self.skipped += 1
                return
        if actual is None or expected is None:
            if (actual is None) != (expected is None):
                self.fail(what, f"got {'None' if actual is None else 'a tensor'}, expected "
                                f"{'None' if expected is None else 'a tensor'}")  # fmt: skip
            return
        err, detail = compare(actual, expected)
        if not err <= tol:
            self.failures.append({"check": what, "error": err if math.isfinite(err) else str(err), "tol": tol,
                                  "detail": detail})  # fmt: skip

    def close_torch(self, what: str, actual, theirs, expected, tol: float):
        """actual within tol of torch.nn's result, where torch.nn's is within tol of the float64
        reference (elsewhere torch.nn is not an oracle: counted in torch_off)."""
        if theirs is None or expected is None:
            return
        err, _ = compare(theirs, expected)
        if not err <= tol:
            self.torch_off += 1
            return
        self.close(what, actual, theirs, tol)

    def placed(self, what: str, actual, theirs, expected):
        """actual's NaN and ±inf where torch.nn's are; where they differ and actual's are the float64
        reference's, torch.nn is off the reference (counted in torch_off, as fuzz_kernels.py notes
        it), else a failure."""
        ours, torch_nn = _nonfinite_pattern(actual), _nonfinite_pattern(theirs)
        if ours is not None and torch_nn is not None and expected is not None and not torch.equal(ours, torch_nn):
            e = expected.detach() if isinstance(expected, torch.Tensor) else np.asarray(expected)
            if torch.equal(ours, _nonfinite_pattern(torch.as_tensor(e))):
                self.checks += 1
                self.torch_off += 1
                return
        self.close(what, ours, torch_nn, 0.0)

    def fail(self, what: str, detail: str):
        self.failures.append({"check": what, "detail": detail})

    def true(self, what: str, ok: bool, detail: str = ""):
        self.checks += 1
        if not ok:
            self.fail(what, detail)


def _nonfinite_pattern(t: torch.Tensor | None):
    """0 finite, 1 NaN, 2 +inf, 3 -inf: where the non-finite values are."""
    if t is None:
        return None
    t = t.detach().double()
    return torch.where(torch.isnan(t), 1.0, torch.where(t == math.inf, 2.0, torch.where(t == -math.inf, 3.0, 0.0)))

