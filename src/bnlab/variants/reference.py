"""The BN variants in float64 NumPy, written from the papers' definitions: the oracle their tests use.

Like bnlab.reference (which this builds on), it never touches torch. Layout (N, C, *spatial).
Ghost BN: Hoffer et al. 2017; Batch Renormalization: Ioffe 2017 (its Algorithm 1 and the
backward equations of its §3); masked BN: the statistics of the selected positions.
"""

from __future__ import annotations

import numpy as np

from bnlab import reference as ref

__all__ = [
    "ghost_forward_train",
    "ghost_backward",
    "renorm_forward_train",
    "renorm_backward",
    "masked_forward_train",
    "masked_backward",
]


def _pc(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


# -- Ghost BN ---------------------------------------------------------------------------------


def ghost_forward_train(x, gamma=None, beta=None, eps=1e-5, virtual_batch_size=None):
    """Each consecutive chunk of ``virtual_batch_size`` samples normalized with its own statistics.

    Returns ``(y, caches, whole)``: the output, one reference.TrainCache per ghost batch, and the
    Moments of the whole batch (what the running averages are updated with).
    """
    x = np.asarray(x, dtype=np.float64)
    k = virtual_batch_size or x.shape[0]
    outputs, caches = [], []
    for start in range(0, x.shape[0], k):
        y, cache = ref.forward_train(x[start : start + k], gamma, beta, eps)
        outputs.append(y)
        caches.append(cache)
    return np.concatenate(outputs, axis=0), caches, ref.moments(x)


def ghost_backward(dy, caches):
    """(dx, dgamma, dbeta): each ghost batch's own BN backward; γ and β are shared, so their gradients add."""
    dy = np.asarray(dy, dtype=np.float64)
    dxs, dgamma, dbeta, start = [], 0.0, 0.0, 0
    for cache in caches:
        n = cache.x.shape[0]
        dx, dg, db = ref.backward(dy[start : start + n], cache)
        dxs.append(dx)
        dgamma, dbeta, start = dgamma + dg, dbeta + db, start + n
    return np.concatenate(dxs, axis=0), dgamma, dbeta


# -- Batch Renormalization --------------------------------------------------------------------


def renorm_forward_train(x, gamma, beta, running_mean, running_var, eps=1e-5, rmax=3.0, dmax=5.0):
    """Ioffe 2017, Algorithm 1 (training): x̂ = (x - μ_B)/σ_B · r + d, y = γ·x̂ + β.

    σ_B = sqrt(eps + biased batch variance), σ = sqrt(running_var + eps),
    r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B - μ)/σ, -dmax, dmax).

    Returns ``(y, cache)`` where cache is a dict with x, mu_b, sigma_b, r, d, x_hat, gamma.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = ref.reduce_axes(x)
    nd = x.ndim
    gamma = np.ones(x.shape[1]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(x.shape[1]) if beta is None else np.asarray(beta, dtype=np.float64)
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(eps + ((x - _pc(mu_b, nd)) ** 2).mean(axis=axes))
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mu_b - np.asarray(running_mean, dtype=np.float64)) / sigma, -dmax, dmax)
    x_hat = (x - _pc(mu_b, nd)) / _pc(sigma_b, nd) * _pc(r, nd) + _pc(d, nd)
    y = _pc(gamma, nd) * x_hat + _pc(beta, nd)
    cache = {"x": x, "mu_b": mu_b, "sigma_b": sigma_b, "r": r, "d": d, "x_hat": x_hat, "gamma": gamma}
    return y, cache


def renorm_backward(dy, cache):
    """The paper's backward (§3), r and d held constant; returns (dx, dgamma, dbeta).

    ∂ℓ/∂x̂ = ∂ℓ/∂y·γ;  ∂ℓ/∂σ_B = Σ ∂ℓ/∂x̂·(x - μ_B)·(-r/σ_B²);  ∂ℓ/∂μ_B = Σ ∂ℓ/∂x̂·(-r/σ_B);
    ∂ℓ/∂x = ∂ℓ/∂x̂·r/σ_B + ∂ℓ/∂σ_B·(x - μ_B)/(m·σ_B) + ∂ℓ/∂μ_B/m;  ∂ℓ/∂γ = Σ ∂ℓ/∂y·x̂;  ∂ℓ/∂β = Σ ∂ℓ/∂y.
    """
    dy = np.asarray(dy, dtype=np.float64)
    axes = ref.reduce_axes(dy)
    nd = dy.ndim
    m = float(np.prod([dy.shape[a] for a in axes]))
    x, mu_b, sigma_b, r = cache["x"], cache["mu_b"], cache["sigma_b"], cache["r"]
    centered = x - _pc(mu_b, nd)
    dx_hat = dy * _pc(cache["gamma"], nd)
    dsigma_b = (dx_hat * centered).sum(axis=axes) * (-r / sigma_b**2)
    dmu_b = dx_hat.sum(axis=axes) * (-r / sigma_b)
    dx = dx_hat * _pc(r / sigma_b, nd) + _pc(dsigma_b, nd) * centered / _pc(m * sigma_b, nd) + _pc(dmu_b / m, nd)
    return dx, (dy * cache["x_hat"]).sum(axis=axes), dy.sum(axis=axes)


# -- Masked BN --------------------------------------------------------------------------------


def masked_forward_train(x, mask, gamma=None, beta=None, eps=1e-5):
    """Statistics over the positions where mask (N, *spatial) is True; every position normalized with them.

    Returns ``(y, cache)``: cache is a dict with x, s (the mask as 0/1 broadcastable to x),
    mean, var (biased, over the selected positions), x_hat, gamma and the Moments of the selection.
    """
    x = np.asarray(x, dtype=np.float64)
    nd = x.ndim
    sel = np.asarray(mask, dtype=bool)
    gamma = np.ones(x.shape[1]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(x.shape[1]) if beta is None else np.asarray(beta, dtype=np.float64)
    # The selected values of each channel, as an (M, C) batch of dense BN.
    selected = np.moveaxis(x, 1, -1)[sel]
    stats = ref.moments(selected)
    mean, var, invstd = ref.finalize(stats, eps)
    x_hat = (x - _pc(mean, nd)) * _pc(invstd, nd)
    y = _pc(gamma, nd) * x_hat + _pc(beta, nd)
    s = np.expand_dims(sel, 1).astype(np.float64)
    return y, {"x": x, "s": s, "mean": mean, "var": var, "x_hat": x_hat, "gamma": gamma, "eps": eps, "moments": stats}


def masked_backward(dy, cache):
    """Backward through the graph, node by node as reference.backward_graph, with the statistics over the selection.

    ∂ℓ/∂σ² = Σ ∂ℓ/∂x̂·(x - μ)·(-1/2)(σ² + ε)^(-3/2) and ∂ℓ/∂μ = Σ ∂ℓ/∂x̂·(-1/sqrt(σ² + ε)), summed
    over every position (each output depends on μ and σ²); μ and σ² depend on the selected
    positions only: ∂ℓ/∂x = ∂ℓ/∂x̂/sqrt(σ² + ε) + s·(∂ℓ/∂σ²·2(x - μ)/m + ∂ℓ/∂μ/m).
    Returns (dx, dgamma, dbeta).
    """
    dy = np.asarray(dy, dtype=np.float64)
    axes = ref.reduce_axes(dy)
    nd = dy.ndim
    x, s = cache["x"], cache["s"]
    m = float(cache["moments"].count)
    centered = x - _pc(cache["mean"], nd)
    var_eps = cache["var"] + cache["eps"]
    dx_hat = dy * _pc(cache["gamma"], nd)
    dvar = (dx_hat * centered).sum(axis=axes) * -0.5 * var_eps**-1.5
    # d(var)/d(mean) = -2 Σ_selected (x - μ)/m = 0: only the direct path from x̂ reaches μ.
    dmean = -dx_hat.sum(axis=axes) / np.sqrt(var_eps)
    dx = dx_hat / _pc(np.sqrt(var_eps), nd) + s * (_pc(dvar, nd) * 2.0 * centered / m + _pc(dmean, nd) / m)
    return dx, (dy * cache["x_hat"]).sum(axis=axes), dy.sum(axis=axes)
