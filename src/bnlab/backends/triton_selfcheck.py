"""A first-use check of the Triton kernels on each device, with a fall-back instead of a crash.

The kernels are compiled by Triton when they first run on a GPU. A compiler or driver that
rejects them (an old GPU, a Triton release that changed an API) must not break a user's model:
the first time the Triton backend meets a tensor on a device, it runs its kernels once on small
inputs of both layouts and compares them with the portable backend. If they raise or disagree,
the backend declines that device with one warning, and bnlab runs the portable path there.
"""

from __future__ import annotations

import warnings

import torch

# Small, odd shapes that reach the NCL and channels-last kernel variants.
_PROBES = [((6, 3, 5, 7), torch.contiguous_format), ((5, 4, 3, 3), torch.channels_last), ((37, 5), None)]
_TOLERANCE = 1e-3


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp(min=1.0))


def kernels_agree(backend, reference, device: torch.device) -> str | None:
    """Run ``backend``'s forward and backward on small probes on ``device``; None if all agree with ``reference``.

    Returns a one-line reason otherwise (an exception or the largest disagreement).
    """
    gen = torch.Generator().manual_seed(0)
    try:
        for shape, layout in _PROBES:
            x = (torch.randn(shape, generator=gen) * 2 + 1).to(device)
            dy = torch.randn(shape, generator=gen).to(device)
            if layout is not None:
                x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
            w = (torch.rand(shape[1], generator=gen) + 0.5).to(device)
            b = torch.randn(shape[1], generator=gen).to(device)
            got_y, got_stats, got_invstd = backend.forward_train(x, w, b, 1e-5)
            ref_y, ref_stats, ref_invstd = reference.forward_train(x, w, b, 1e-5)
            got_dx, got_dw, got_db = backend.backward(dy, x, got_stats.mean, got_invstd, w, got_stats.count, True)
            ref_dx, ref_dw, ref_db = reference.backward(dy, x, ref_stats.mean, ref_invstd, w, ref_stats.count, True)
            for name, got, want in (("y", got_y, ref_y), ("dx", got_dx, ref_dx), ("dweight", got_dw, ref_dw),
                                    ("dbias", got_db, ref_db)):  # fmt: skip
                err = _max_rel(got, want)
                if not err <= _TOLERANCE:  # NaN fails too
                    return f"{name} differs from the portable backend by {err:.3g} on shape {shape}"
    except Exception as exc:  # compile or launch failure: any of them means "do not use here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def decline_with_warning(device: torch.device, reason: str) -> None:
    warnings.warn(
        f"bnlab: the Triton kernels failed their first-use check on {device} ({reason}); "
        f"BatchNorm runs bnlab's portable backend there instead (same results, slower). "
        f"Please report this with your GPU, driver, torch and triton versions.",
        RuntimeWarning,
        stacklevel=3,
    )
