"""Triton kernels of BN's reduce phase: per-channel partial statistics and gradient sums, and their merge.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

The input is addressed as x[n, c, l] = x_ptr + n*sN + c*sC + l*sL, with the reduction index
m = n*L + l over M = N*L values per channel (ROWS_FLAT: L == 1, so m = n and no division).
Grid: (channel blocks, segments). Each program reduces BLOCK_C channels over one segment of
SEG rows in tiles of BLOCK_M x BLOCK_C, so that a few channels still spread over the whole
GPU; the segments' partials are merged by a second, per-channel kernel (Chan's rule), in float64.

Precision (DEVELOPERS.md): values are shifted by the channel's first value K before anything is
summed, tile statistics are two-pass in registers, and everything is accumulated in float64 —
fp32 data at 1e3 ± 0.01 keeps its variance, fp32 data near 1e18 has finite squares.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offsets(m, c, L, sN, sC, sL, ROWS_FLAT: tl.constexpr):
    """Element offsets of a [BLOCK_M, BLOCK_C] tile: rows m (reduction index), channels c."""
    if ROWS_FLAT:
        row = m * sN
    else:
        row = (m // L) * sN + (m % L) * sL
    return row[:, None] + c[None, :] * sC


@triton.jit
def stats_partial_kernel(
    x_ptr,  # input, any float dtype; element (n, c, l) at n*sN + c*sC + l*sL
    part_ptr,  # (S, C, 3) float64 out: count, mean of (x - K), M2 of this segment
    C, L, M, SEG,  # channels, spatial size, values per channel (N*L), rows per segment
    sN, sC, sL,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FLAT: tl.constexpr,
):  # fmt: skip
    cb, s = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    shift = tl.load(x_ptr + c * sC, mask=c_ok, other=0.0).to(tl.float64)  # K: x[0, c, 0]
    n_acc = tl.full([], 0.0, tl.float64)
    mean_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    start = s * SEG
    end = tl.minimum(start + SEG, M)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = (m < end)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + _offsets(m, c, L, sN, sC, sL, ROWS_FLAT), mask=ok, other=0.0).to(tl.float64)
        d = tl.where(ok, x - shift[None, :], 0.0)
        cnt = tl.minimum(end - m0, BLOCK_M).to(tl.float64)
        t_mean = tl.sum(d, axis=0) / cnt
        t_m2 = tl.sum(tl.where(ok, (d - t_mean[None, :]) * (d - t_mean[None, :]), 0.0), axis=0)
        n_new = n_acc + cnt
        delta = t_mean - mean_acc
        mean_acc += delta * (cnt / n_new)
        m2_acc += t_m2 + delta * delta * (n_acc * cnt / n_new)
        n_acc = n_new
    out = part_ptr + (s * C + c) * 3
    tl.store(out, tl.zeros([BLOCK_C], dtype=tl.float64) + n_acc, mask=c_ok)
    tl.store(out + 1, mean_acc, mask=c_ok)
    tl.store(out + 2, m2_acc, mask=c_ok)


@triton.jit
def stats_merge_kernel(
    part_ptr,  # (S, C, 3) float64 from stats_partial_kernel
    x_ptr,  # the input, for the shift K = x[0, c, 0]
    stats_ptr,  # (3, C) float64 out: mean, M2, invstd
    coef_ptr,  # (3, C) float32 out: hi, scale, shift of y = (x - hi)·scale + shift
    w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr,  # weight, bias, running mean/var (any float), counter (int64)
    C, S, sC, eps, momentum,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < S
    n_s = tl.load(part_ptr + (s * C + c) * 3, mask=ok, other=0.0)
    mean_s = tl.load(part_ptr + (s * C + c) * 3 + 1, mask=ok, other=0.0)
    m2_s = tl.load(part_ptr + (s * C + c) * 3 + 2, mask=ok, other=0.0)
    n = tl.sum(n_s, axis=0)
    mean_d = tl.sum(n_s * mean_s, axis=0) / n  # K-way Chan: weighted means, then spread of the means
    m2 = tl.sum(m2_s, axis=0) + tl.sum(n_s * (mean_s - mean_d) * (mean_s - mean_d), axis=0)
    mean = tl.load(x_ptr + c * sC).to(tl.float64) + mean_d
    invstd = 1.0 / tl.sqrt(m2 / n + eps)
    tl.store(stats_ptr + c, mean)
    tl.store(stats_ptr + C + c, m2)
    tl.store(stats_ptr + 2 * C + c, invstd)
    # Normalize coefficients, split as bnlab.stats.split_mean: x - hi is exact near the mean.
    hi = mean.to(tl.float32)
    lo = (mean - hi.to(tl.float64)).to(tl.float32).to(tl.float64)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c).to(tl.float64)
    shift = -lo * scale
    if HAS_B:
        shift += tl.load(b_ptr + c).to(tl.float64)
    tl.store(coef_ptr + c, hi)
    tl.store(coef_ptr + C + c, scale.to(tl.float32))
    tl.store(coef_ptr + 2 * C + c, shift.to(tl.float32))
    if UPDATE:
        factor = momentum + tl.zeros([], tl.float64)  # a float64 scalar, compiled or interpreted
        if CUMULATIVE:
            factor = 1.0 / tl.load(nbt_ptr).to(tl.float64)  # the caller counted this batch already
        if n > 1:
            rm = tl.load(rm_ptr + c)
            rv = tl.load(rv_ptr + c)
            new_m = rm.to(tl.float64) * (1.0 - factor) + mean * factor
            new_v = rv.to(tl.float64) * (1.0 - factor) + m2 / (n - 1.0) * factor
            tl.store(rm_ptr + c, new_m.to(rm.dtype))
            tl.store(rv_ptr + c, new_v.to(rv.dtype))


@triton.jit
def grad_partial_kernel(
    dy_ptr, x_ptr,  # upstream gradient and input, same strides
    mask_ptr,  # ReLU mask, 1 bit per element by storage offset (HAS_MASK), else unused
    hi_ptr,  # (C,) float32: the mean rounded to float32 (coef row 0 of the forward)
    part_ptr,  # (S, C, 2) float64 out: Σdz, Σdz·(x - hi) over the segment
    C, L, M, SEG, sN, sC, sL,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_FLAT: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    cb, s = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    hi = tl.load(hi_ptr + c, mask=c_ok, other=0.0)
    acc_dy = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_dyx = tl.zeros([BLOCK_C], dtype=tl.float64)
    start = s * SEG
    end = tl.minimum(start + SEG, M)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = (m < end)[:, None] & c_ok[None, :]
        offs = _offsets(m, c, L, sN, sC, sL, ROWS_FLAT)
        dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_MASK:
            bits = tl.load(mask_ptr + offs // 8, mask=ok, other=0).to(tl.int32)
            dz = tl.where(((bits >> (offs % 8)) & 1) != 0, dz, 0.0)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # fp32 within a tile, float64 across tiles (the portable backend sums fp32 products in float64)
        acc_dy += tl.sum(dz, axis=0).to(tl.float64)
        acc_dyx += tl.sum(tl.where(ok, dz * (x - hi[None, :]), 0.0), axis=0).to(tl.float64)
    out = part_ptr + (s * C + c) * 2
    tl.store(out, acc_dy, mask=c_ok)
    tl.store(out + 1, acc_dyx, mask=c_ok)


@triton.jit
def grad_merge_kernel(
    part_ptr,  # (S, C, 2) float64 from grad_partial_kernel
    stats_ptr,  # (3, C) float64: mean, M2, invstd of the forward
    w_ptr,  # weight (any float) if HAS_W
    sums_ptr,  # (2, C) float64 out: Σdy, Σdy·x̂
    coef_ptr,  # (4, C) float32 out: hi, kk, a, cc of dx = kk·dz + a·(x - hi) + cc
    dw_ptr, db_ptr,  # dweight/dbias outputs in their own dtypes, if WRITE_DW/WRITE_DB
    C, S, count,
    HAS_W: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < S
    sdy = tl.sum(tl.load(part_ptr + (s * C + c) * 2, mask=ok, other=0.0), axis=0)
    sdyx = tl.sum(tl.load(part_ptr + (s * C + c) * 2 + 1, mask=ok, other=0.0), axis=0)
    mean = tl.load(stats_ptr + c)
    invstd = tl.load(stats_ptr + 2 * C + c)
    hi = mean.to(tl.float32)
    lo = (mean - hi.to(tl.float64)).to(tl.float32).to(tl.float64)
    sxh = (sdyx - lo * sdy) * invstd
    tl.store(sums_ptr + c, sdy)
    tl.store(sums_ptr + C + c, sxh)
    kk = invstd
    if HAS_W:
        kk = kk * tl.load(w_ptr + c).to(tl.float64)
    a = -kk * invstd * sxh / count
    cc = -kk * sdy / count - a * lo
    tl.store(coef_ptr + c, hi)
    tl.store(coef_ptr + C + c, kk.to(tl.float32))
    tl.store(coef_ptr + 2 * C + c, a.to(tl.float32))
    tl.store(coef_ptr + 3 * C + c, cc.to(tl.float32))
    if WRITE_DW:
        tl.store(dw_ptr + c, sxh.to(dw_ptr.dtype.element_ty))
    if WRITE_DB:
        tl.store(db_ptr + c, sdy.to(db_ptr.dtype.element_ty))
