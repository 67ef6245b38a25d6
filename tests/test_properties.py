"""Hypothesis properties of BN that hold for every input: invariance, gradient identities, merging."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import reference as ref
from bnlab import stats
from bnlab.functional import batch_norm
from conftest import assert_close

shapes = st.sampled_from([(3, 2), (5, 3), (2, 3, 4), (4, 1, 3), (2, 2, 3, 3), (2, 2, 1, 2, 3)])
seeds = st.integers(0, 2**31 - 1)


def _x(shape, seed, loc=0.0, scale=1.0):
    return torch.from_numpy(np.random.default_rng(seed).normal(loc, scale, size=shape))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds, a=st.floats(0.01, 100.0), c=st.floats(-1e3, 1e3))
def test_invariant_to_positive_affine_maps_of_the_input(shape, seed, a, c):
    """BN(a·x + c) = BN(x) for a > 0, exactly so when eps scales with a² (eps is in units of x²)."""
    x = _x(shape, seed)
    eps = 1e-5
    y = batch_norm(x, None, None, training=True, eps=eps)
    y_mapped = batch_norm(a * x + c, None, None, training=True, eps=eps * a * a)
    assert_close(y_mapped, y, 1e-8, "BN(a x + c)")
    # and BN(x) itself is the reference's: an output wrong in an invariant way (all zeros) fails here
    assert_close(y, ref.forward_train(x.numpy(), None, None, eps)[0], 1e-10, "BN(x)")


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=seeds)
def test_input_gradient_identities(shape, seed):
    """Per channel Σdx = 0, and Σdx·x̂ = γ·invstd·Σdy·x̂·eps/(var + eps) (0 as eps -> 0)."""
    x = _x(shape, seed, loc=1.0, scale=2.0).requires_grad_()
    gen = np.random.default_rng(seed + 1)
    w = torch.from_numpy(gen.uniform(0.5, 2.0, shape[1]))
    dy = torch.from_numpy(gen.normal(size=shape))
    eps = 1e-3
    y = batch_norm(x, None, None, w, None, training=True, eps=eps)
    y.backward(dy)
    dims = [0] + list(range(2, x.dim()))
    _, cache = ref.forward_train(x.detach().numpy(), w.numpy(), None, eps)
    x_hat = torch.from_numpy(cache.x_hat)
    var = torch.from_numpy(cache.var)
    assert_close(x.grad.sum(dims), torch.zeros(shape[1], dtype=torch.float64), 1e-10, "Σdx")
    expected = w * torch.rsqrt(var + eps) * (dy * x_hat).sum(dims) * eps / (var + eps)
    assert_close((x.grad * x_hat).sum(dims), expected, 1e-10, "Σdx·x̂")
    assert x.grad.abs().max() > 0, "a vanishing gradient would make both identities trivial"


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    seed=seeds,
    loc=st.floats(-1e4, 1e4),
    cuts=st.lists(st.integers(0, 100), min_size=0, max_size=4),
)
def test_merged_partial_statistics_equal_whole_batch(shape, seed, loc, cuts):
    """Chan's merge of any split of the batch (empty pieces included) equals the whole batch's statistics."""
    n = shape[0] * 3
    x = _x((n,) + shape[1:], seed, loc=loc)
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    pieces = [x[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] + [x[:0]]
    whole = ref.moments(x.numpy())
    merged_torch = stats.merge_moments([stats.moments(p) for p in pieces])
    merged_ref = ref.merge_moments([ref.moments(p.numpy()) for p in pieces])
    assert float(merged_torch.count) == whole.count == merged_ref.count
    scale = max(1.0, abs(loc))
    assert_close(merged_torch.mean / scale, whole.mean / scale, 1e-12, "merged mean (torch)")
    assert_close(merged_torch.m2, whole.m2, 1e-9, "merged M2 (torch)")
    assert_close(merged_ref.m2, whole.m2, 1e-9, "merged M2 (reference)")
    direct = stats.moments(x)
    assert_close(direct.m2, whole.m2, 1e-9, "torch moments vs reference")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4).map(lambda s: [max(s[0], 2)] + s[1:]),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.sampled_from([-44, -41, -39, -30, 0, 30, 36, 37, 38]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_portable_statistics_at_the_ends_of_the_float_range(shape, seed, exponent, dtype):
    # The portable backend's moments (bnlab.stats): channels whose largest value is subnormal got an
    # infinite scale (NaN statistics), and float32 data near 1e37 overflowed the sums of the shift
    # (NaN statistics, the batch then skipped by the guard); float64 down to its own subnormals too.
    gen = torch.Generator().manual_seed(seed)
    x64 = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) * 10.0**exponent
    if dtype == torch.float64:
        x64 = x64 * 10.0**-270 if exponent < -30 else x64
    x = x64.to(dtype)
    if not torch.isfinite(x).all() or not x.abs().max() > 0:
        return  # overflowed or flushed to zero in the dtype: nothing to compare
    got = stats.moments(x)
    # the reference on the values scaled to about 1 (a power of two: exact), whose squares neither
    # overflow nor underflow float64, then scaled back
    k = -math.frexp(float(x.double().abs().max()))[1]
    want = ref.moments(np.ldexp(x.double().numpy(), k))
    assert torch.isfinite(got.mean).all() and torch.isfinite(got.m2).all()
    assert_close(np.ldexp(got.mean.numpy(), k), want.mean, 1e-6)
    if dtype == torch.float32:  # float64 subnormals' squares underflow: their M2 is 0 either way
        assert_close(np.ldexp(got.m2.sqrt().numpy(), k), np.sqrt(want.m2), 1e-5)
