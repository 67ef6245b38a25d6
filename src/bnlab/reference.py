"""Batch Normalization in float64 NumPy: the specification every other backend is tested against.

Written the obvious way, to be read. Every function takes and returns ``numpy.ndarray`` in
float64 and never touches torch. The derivation behind each line is in ``docs/math.md``.

Layout: ``x`` has shape ``(N, C, *spatial)`` with channels on axis 1, as in PyTorch. For
``(N, C)`` each feature is normalized over the batch (dense BN); for ``(N, C, L)``,
``(N, C, H, W)`` and ``(N, C, D, H, W)`` each channel is normalized over N and all spatial axes
(convolutional BN, seed 000). ``m = N * prod(spatial)`` is the number of values per channel.

Conventions (PyTorch's, see ``docs/conventions.md``): the batch is normalized with the *biased*
variance (divide by m); the running variance stores the *unbiased* one (divide by m - 1);
``momentum`` is the weight of the *new* batch; ``momentum=None`` is a cumulative average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "TOLERANCE",
    "Moments",
    "moments",
    "merge_moments",
    "finalize",
    "forward_train",
    "forward_eval",
    "backward",
    "backward_graph",
    "update_running_stats",
    "decay_to_momentum",
    "momentum_to_decay",
    "reduce_axes",
    "TrainCache",
]


#: How far every bnlab path may be from this reference (and from torch.nn), by the input's dtype
#: name: max |error| / max(1, max |reference|) of an output, gradient or statistic. Rounding for
#: float64, issue 5's 2e-4 for float32, a few units in the last place for bfloat16 and float16.
#: The tests, the differential fuzzers and the GPU check all read this one table.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 2e-2, "float16": 4e-3}


def reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    """The axes BN averages over: every axis but the channel axis 1."""
    if x.ndim < 2:
        raise ValueError(f"x: expected an array of rank >= 2 with channels on axis 1, got shape {x.shape}")
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts against an (N, C, *spatial) array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------------------------
# Reduce phase: per-channel statistics and how to merge them.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """Per-channel statistics of a set of values: how many, their mean, and M2 = Σ(x - mean)².

    ``count`` is a scalar (the same for every channel); ``mean`` and ``m2`` have shape (C,).
    The biased variance is ``m2 / count``, the unbiased one ``m2 / (count - 1)``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray


def moments(x: np.ndarray) -> Moments:
    """Two-pass per-channel statistics of ``x`` (N, C, *spatial): first the mean, then Σ(x - mean)².

    Two passes, not E[x²] - E[x]²: the one-pass form cancels catastrophically when |mean| ≫ std.
    An empty batch has count 0, mean 0 and M2 0 (the neutral element of :func:`merge_moments`).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x)
    count = float(np.prod([x.shape[a] for a in axes]))
    if count == 0:
        zeros = np.zeros(x.shape[1])
        return Moments(0.0, zeros, zeros.copy())
    mean = x.mean(axis=axes)
    m2 = ((x - _per_channel(mean, x.ndim)) ** 2).sum(axis=axes)
    return Moments(count, mean, m2)


def merge_moments(parts: list[Moments]) -> Moments:
    """Combine the statistics of disjoint pieces of a batch into those of the whole (Chan et al. 1979).

    For two pieces a and b with n = n_a + n_b and δ = mean_b - mean_a:
    mean = mean_a + δ·n_b/n and M2 = M2_a + M2_b + δ²·n_a·n_b/n. Pieces may have any counts,
    zero included, so this serves uneven per-rank batches in SyncBatchNorm.
    """
    if not parts:
        raise ValueError("parts: expected at least one Moments to merge, got an empty list")
    total = parts[0]
    for part in parts[1:]:
        n = total.count + part.count
        if n == 0:
            continue
        delta = part.mean - total.mean
        mean = total.mean + delta * (part.count / n)
        m2 = total.m2 + part.m2 + delta**2 * (total.count * part.count / n)
        total = Moments(n, mean, m2)
    return total


def finalize(stats: Moments, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From (count, mean, M2) to what the elementwise phase needs: mean, biased variance, 1/sqrt(var + eps)."""
    var = stats.m2 / stats.count
    invstd = 1.0 / np.sqrt(var + eps)
    return stats.mean, var, invstd


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainCache:
    """What the training forward keeps for the backward pass.

    Shapes: ``x``, ``x_hat`` (N, C, *spatial); ``mean``, ``var``, ``gamma`` (C,); ``eps`` scalar.
    """

    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray
    eps: float


def forward_train(
    x: np.ndarray, gamma: np.ndarray | None = None, beta: np.ndarray | None = None, eps: float = 1e-5
) -> tuple[np.ndarray, TrainCache]:
    """Training-mode BN with the mini-batch's own statistics (seed 001's four equations).

    μ_B = mean over the batch, σ²_B = biased variance, x̂ = (x - μ_B)/sqrt(σ²_B + eps), y = γ·x̂ + β.

    Args:
        x: (N, C, *spatial) input.
        gamma: (C,) scale, or None for 1.
        beta: (C,) shift, or None for 0.
        eps: added to the variance before the square root.

    Returns:
        ``(y, cache)``: y has the shape of x; cache holds what :func:`backward` needs,
        including the batch mean and biased variance (C,).
    """
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[1]
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, dtype=np.float64)
    mean, var, invstd = finalize(moments(x), eps)
    x_hat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    y = _per_channel(gamma, x.ndim) * x_hat + _per_channel(beta, x.ndim)
    return y, TrainCache(x=x, x_hat=x_hat, mean=mean, var=var, gamma=gamma, eps=float(eps))


def forward_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Inference-mode BN: the same affine map, with fixed (running) statistics in place of the batch's.

    Shapes: x (N, C, *spatial); running_mean, running_var, gamma, beta (C,). Returns y like x.
    """
    x = np.asarray(x, dtype=np.float64)
    channels = x.shape[1]
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    x_hat = (x - _per_channel(running_mean, x.ndim)) * _per_channel(invstd, x.ndim)
    return _per_channel(gamma, x.ndim) * x_hat + _per_channel(beta, x.ndim)


# --------------------------------------------------------------------------------------------
# Backward: the step-by-step graph form of seed 001, and the closed form.
# --------------------------------------------------------------------------------------------


def backward_graph(dy: np.ndarray, cache: TrainCache) -> dict[str, np.ndarray]:
    """Backward through the computation graph, one node at a time, exactly as seed 001 writes it.

    With m values per channel (sums run over every axis but the channel axis):

    - ∂ℓ/∂x̂ᵢ = ∂ℓ/∂yᵢ · γ
    - ∂ℓ/∂σ² = Σᵢ ∂ℓ/∂x̂ᵢ · (xᵢ - μ) · (-1/2)(σ² + ε)^(-3/2)
    - ∂ℓ/∂μ  = Σᵢ ∂ℓ/∂x̂ᵢ · (-1/sqrt(σ² + ε))     (the path through σ² adds
      ∂ℓ/∂σ² · Σᵢ -2(xᵢ - μ)/m, which is exactly 0 because Σᵢ (xᵢ - μ) = 0)
    - ∂ℓ/∂xᵢ = ∂ℓ/∂x̂ᵢ / sqrt(σ² + ε) + ∂ℓ/∂σ² · 2(xᵢ - μ)/m + ∂ℓ/∂μ / m
    - ∂ℓ/∂γ  = Σᵢ ∂ℓ/∂yᵢ · x̂ᵢ
    - ∂ℓ/∂β  = Σᵢ ∂ℓ/∂yᵢ

    (The seed's third line writes the first term of ∂ℓ/∂xᵢ with a stray Σ; the chain rule, and
    the finite-difference test in tests/test_reference.py, give the unsummed term above.)

    Returns:
        dict with keys ``dx_hat``, ``dx`` (shape of x), ``dvar``, ``dmean``, ``dgamma``, ``dbeta`` (C,).
    """
    dy = np.asarray(dy, dtype=np.float64)
    ndim = dy.ndim
    axes = reduce_axes(dy)
    m = float(np.prod([dy.shape[a] for a in axes]))
    centered = cache.x - _per_channel(cache.mean, ndim)  # (N, C, *spatial): xᵢ - μ
    var_eps = cache.var + cache.eps  # (C,)

    dx_hat = dy * _per_channel(cache.gamma, ndim)
    dvar = (dx_hat * centered).sum(axis=axes) * -0.5 * var_eps**-1.5
    # d(var)/d(mean) = -2 Σ(xᵢ - μ)/m = 0, so only the direct path from x̂ contributes.
    dmean = (dx_hat * -1.0).sum(axis=axes) / np.sqrt(var_eps)
    dx = (
        dx_hat / _per_channel(np.sqrt(var_eps), ndim)
        + _per_channel(dvar, ndim) * 2.0 * centered / m
        + _per_channel(dmean, ndim) / m
    )
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return {"dx_hat": dx_hat, "dvar": dvar, "dmean": dmean, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def backward(dy: np.ndarray, cache: TrainCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form backward: the graph form with its terms collected.

    dx = γ/sqrt(σ² + ε) · (dy - mean(dy) - x̂ · mean(dy·x̂)), where the means run over the
    m values of a channel; dγ = Σ dy·x̂; dβ = Σ dy. This is the shape every fast backend uses:
    one reduce phase (Σdy, Σdy·x̂) followed by one elementwise phase.

    Returns:
        ``(dx, dgamma, dbeta)`` with shapes of x, (C,), (C,).
    """
    dy = np.asarray(dy, dtype=np.float64)
    ndim = dy.ndim
    axes = reduce_axes(dy)
    m = float(np.prod([dy.shape[a] for a in axes]))
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    if m == 0:
        return np.zeros_like(dy), dgamma, dbeta
    scale = cache.gamma / np.sqrt(cache.var + cache.eps)
    dx = _per_channel(scale, ndim) * (
        dy - _per_channel(dbeta / m, ndim) - cache.x_hat * _per_channel(dgamma / m, ndim)
    )
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Running statistics for inference.
# --------------------------------------------------------------------------------------------


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch: Moments,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One step of the running averages kept for inference, in PyTorch's convention.

    ``new = (1 - momentum) · old + momentum · batch``: momentum is the weight of the *new* batch
    (Keras, Flax and the book of seed 004 call 1 - momentum the "decay" or "momentum"; see
    :func:`decay_to_momentum`). The variance stored is the unbiased batch variance
    M2/(count - 1). With ``momentum=None`` the factor is 1/num_batches (a cumulative average of
    every batch so far), counting this batch.

    Args:
        running_mean, running_var: (C,) current averages.
        batch: statistics of this batch.
        momentum: weight of the new batch in [0, 1], or None for the cumulative average.
        num_batches_tracked: batches seen before this one.

    Returns:
        ``(running_mean, running_var, num_batches_tracked)`` after this batch, as new arrays.
    """
    num_batches_tracked = int(num_batches_tracked) + 1
    factor = 1.0 / num_batches_tracked if momentum is None else float(momentum)
    unbiased_var = batch.m2 / (batch.count - 1)
    new_mean = (1.0 - factor) * np.asarray(running_mean, dtype=np.float64) + factor * batch.mean
    new_var = (1.0 - factor) * np.asarray(running_var, dtype=np.float64) + factor * unbiased_var
    return new_mean, new_var, num_batches_tracked


def decay_to_momentum(decay: float) -> float:
    """Keras/Flax/seed-004 "momentum" (weight of the *old* average, e.g. 0.9 or 0.99) to PyTorch's (0.1, 0.01)."""
    _check_fraction(decay, "decay")
    return 1.0 - decay


def momentum_to_decay(momentum: float) -> float:
    """PyTorch momentum (weight of the *new* batch, e.g. 0.1) to the Keras/Flax "decay" (0.9)."""
    _check_fraction(momentum, "momentum")
    return 1.0 - momentum


def _check_fraction(value: object, name: str) -> None:
    """A real number in [0, 1], else an error naming ``name`` (a string, None or a bool had given
    Python's own comparison error, or passed as 0/1). momentum=None, PyTorch's cumulative average,
    has no decay."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        extra = " (momentum=None, the cumulative average, has no decay)" if value is None else ""
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__} {value!r}{extra}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
