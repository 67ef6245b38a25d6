"""Triton kernels of the backward's reduce phase: per-channel Σdz and Σdz'·(x - hi), and their merge.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``. Same
layouts, tiles and segments as triton_reduce. dz is dy, or dy masked by the fused layer's ReLU
mask: rows of K positions (NCL: row n*C + c, position l; NLC: row m, position c), each row padded
to K8B = ceil(K / 8) bytes, bit k % 8 of byte row*K8B + k // 8.

CENTRED (the training backward: the mean is x's own batch mean, so Σ(x - mean) = 0): dz' = dz - g,
g from a sample of the channel's dy (centre_shift: its mean where that stands out of its range,
else 0), and the merge takes lo·Σ(dz - g) off instead of lo·Σdz. Where dy has a large common part,
the float32 products (dz - g)·(x - hi) round far less than dz·(x - hi) (docs/math.md §4.2; the CPU
kernels' grad_totals and centre_shift). Otherwise (fixed statistics) dz' = dz.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bnlab.backends.triton_mask import relu_masked
from bnlab.backends.triton_reduce import dx_constant, mean_remainder, minus_remainder, narrow, rounded_mean_constant


@triton.jit
def centre_shift(dy_ptr, base, ok, run, stride, total):
    """g of CENTRED for channels whose dy values start at ``base`` ([B]; NCL: c·L, run L, stride C·L;
    NLC: c, run 1, stride C; total values each), float32 [B], by the CPU kernels' centre_shift rule
    (in float32 where they work in float64: the same g but for its last bit): from 16 values, four
    runs of four a quarter of the channel apart (value j at base + (j // run)·stride + j % run; all
    of them where there are fewer), their mean where |mean| > max - min, the value itself where
    the finite ones are all equal, else 0."""
    i = tl.arange(0, 16)
    j = tl.where(total < 16, i, (i // 4) * (total // 4) + i % 4).to(tl.int64)
    take = (i < total)[:, None] & ok[None, :]
    offs = base.to(tl.int64)[None, :] + (j // run * stride + j % run)[:, None]
    # float32 (the values' own precision at most): a float64 [16, B] tile made the one-program
    # backward spill 8-16 bytes on sm_90; g need not be dy's mean to the last bit
    v = tl.load(dy_ptr + offs, mask=take, other=0.0).to(tl.float32)
    fin = take & (tl.abs(v) < float("inf"))
    n = tl.sum(fin.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(fin, v, 0.0), axis=0) / tl.maximum(n, 1.0)
    high = tl.max(tl.where(fin, v, -float("inf")), axis=0)
    low = tl.min(tl.where(fin, v, float("inf")), axis=0)
    g = tl.where(tl.abs(mean) > high - low, mean, 0.0)
    g = tl.where(high == low, high, g)  # all equal: that value (a constant channel: Σ(dz - g) = 0)
    return tl.where(n > 0, g, 0.0)


@triton.jit
def centred_exactly(x, hi, nlo, dz):
    """x - hi for dz·(x - mean), with -lo (``nlo``) where x - hi is 0 and dz infinite: there inf·0
    added NaN to Σdz'·(x - hi), where the exact x - mean = -lo gives the float64 reference's ±inf
    (docs/math.md §4.2; the CPU kernels' sums_at_rounded_means). Elsewhere x - hi itself, whose
    products keep their bits: a finite dz at x = hi still adds its 0 (lo·Σdz is taken off once, in
    the merge)."""
    xc = x - hi
    return tl.where((xc == 0.0) & (tl.abs(dz) == float("inf")), nlo, xc)


@triton.jit
def minus_lo(stats_ptr, c, hi, ok):
    """-lo, lo = mean - hi rounded to float32, of channels c (the mean: row 0 of stats, float64)."""
    mean = tl.load(stats_ptr + c, mask=ok, other=0.0)
    return -mean_remainder(mean, hi)


@triton.jit
def grad_ncl_kernel(
    dy_ptr, x_ptr,  # (N, C, L) contiguous
    mask_ptr,  # ReLU mask (HAS_MASK), rows n*C + c of K8B bytes
    hi_ptr,  # (C,) float32: the mean rounded to float32
    stats_ptr,  # (3, C) float64: the mean (row 0), for -lo (centred_exactly)
    part_ptr,  # (S, C, 2) float64 out: Σdz, Σdz'·(x - hi) per segment
    N, C, L, LB, TPS, K8B,
    STRIDE, TOTAL,  # C·L and N·L for centre_shift, from the host: int64 where they pass 2**31 (see below)
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr, UNROLL: tl.constexpr,
    CENTRED: tl.constexpr,
):  # fmt: skip
    """Each lane sums its own dz and fp32 products dz·(x - hi) in float64, UNROLL tiles per step
    (their loads issued together); the lanes are reduced once, at the end (a block-wide sum per
    tile stalled every warp at a barrier)."""
    c, s = tl.program_id(0), tl.program_id(1)
    hi = tl.load(hi_ptr + c)
    nlo = minus_lo(stats_ptr, c, hi, True)
    if CENTRED:
        cv = tl.zeros([1], tl.int64) + c
        # (C·L and N·L computed here in int32 wrapped where one sample holds 2**31 values, and sent
        # the samples after the first before dy's start: the forty-ninth session's audit. Widened
        # here, the variant with the mask spilled 8 bytes on sm_90: the host's Python ints instead,
        # which Triton types int64 where they need it, as grad_merge_kernel's.)
        g = tl.sum(centre_shift(dy_ptr, cv * L, cv < C, L, STRIDE, TOTAL), axis=0)
    acc_dy = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float64)
    acc_dyx = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float64)
    t_end = tl.minimum((s + 1) * TPS, tl.cdiv(N, BLOCK_N) * LB)
    for t0 in range(s * TPS, t_end, UNROLL):
        for u in tl.static_range(UNROLL):
            t = t0 + u
            n = (t // LB) * BLOCK_N + tl.arange(0, BLOCK_N)
            l_ = (t % LB) * BLOCK_L + tl.arange(0, BLOCK_L)
            row_ok = n < tl.where(t < t_end, N, 0)  # a step's tiles past the segment's end: all masked
            ok = row_ok[:, None] & (l_ < L)[None, :]
            row = n.to(tl.int64) * C + c
            offs = row[:, None] * L + l_[None, :]
            dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_MASK:
                dz = relu_masked(dz, mask_ptr, row * K8B, row_ok, (t % LB) * BLOCK_L, L, K8B, BLOCK_N, BLOCK_L)
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            # products in fp32, sums in float64 (as the portable backend sums fp32 products)
            acc_dy += dz.to(tl.float64)
            if CENTRED:
                dz = dz - g
            acc_dyx += tl.where(ok, dz * centred_exactly(x, hi, nlo, dz), 0.0).to(tl.float64)
    one = tl.zeros([1], dtype=tl.float64)
    out = part_ptr + (s * C + c + tl.arange(0, 1)) * 2
    tl.store(out, one + tl.sum(tl.sum(acc_dy, axis=1), axis=0))
    tl.store(out + 1, one + tl.sum(tl.sum(acc_dyx, axis=1), axis=0))


@triton.jit
def grad_nlc_kernel(
    dy_ptr, x_ptr,  # (M, C) rows of contiguous channels
    mask_ptr,  # ReLU mask (HAS_MASK), rows m of K8B bytes
    hi_ptr, stats_ptr, part_ptr, M, C, SEG, K8B,  # stats_ptr: as grad_ncl_kernel's
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr, UNROLL: tl.constexpr,
    CENTRED: tl.constexpr,
):  # fmt: skip
    cb, s = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    hi = tl.load(hi_ptr + c, mask=c_ok, other=0.0)
    nlo = minus_lo(stats_ptr, c, hi, c_ok)
    if CENTRED:
        g = centre_shift(dy_ptr, c, c_ok, 1, C, M)
    acc_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float64)  # per lane, reduced at the end
    acc_dyx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float64)
    start = s * SEG
    end = tl.minimum(start + SEG, M)
    for m0 in range(start, end, UNROLL * BLOCK_M):
        for u in tl.static_range(UNROLL):
            m = (m0 + u * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            ok = (m < end)[:, None] & c_ok[None, :]
            offs = m[:, None] * C + c[None, :]
            dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_MASK:
                dz = relu_masked(dz, mask_ptr, m * K8B, m < end, cb * BLOCK_C, C, K8B, BLOCK_M, BLOCK_C)
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc_dy += dz.to(tl.float64)
            if CENTRED:
                dz = dz - g[None, :]
            acc_dyx += tl.where(ok, dz * centred_exactly(x, hi[None, :], nlo[None, :], dz), 0.0).to(tl.float64)
    out = part_ptr + (s * C + c) * 2
    tl.store(out, tl.sum(acc_dy, axis=0), mask=c_ok)
    tl.store(out + 1, tl.sum(acc_dyx, axis=0), mask=c_ok)


@triton.jit
def merge_grad_sums(
    part_ptr, stats_ptr, w_ptr, sums_ptr, dw_ptr, db_ptr,  # as grad_merge_kernel's
    c, c_ok, write,  # [B] channels, which of them exist, and which to write the sums of
    g,  # [B] float32: the channels' dy shifts of CENTRED partials (centre_shift), else 0
    C, S, count,
    HAS_W: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Channels c's Σdz and Σdz·x̂ from the S segments' partials, stored (sums, and dweight/dbias
    in their dtypes) for the channels where ``write``; returns the float32 coefficients (hi, kk,
    a, cc, gh) of dx = kk·(dz - gh) + (a·(x - hi) + cc), each [B]: gh is mean(dz) in float32 and cc
    takes the float64 remainders, so that dz's mean comes off before the product (a channel
    constant in x and dz gets dx = 0, where kk·dz + cc left the rounding of kk·dz); where a is
    infinite, cc is -lo instead (rounded_mean_constant, for rounded_mean_term)."""
    s = tl.arange(0, BLOCK_S)
    at = part_ptr + (s[None, :] * C + c[:, None]) * 2
    ok = c_ok[:, None] & (s < S)[None, :]
    sdy = tl.sum(tl.load(at, mask=ok, other=0.0), axis=1)
    sdyx = tl.sum(tl.load(at + 1, mask=ok, other=0.0), axis=1)
    mean = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    hi = mean.to(tl.float32)
    lo = mean_remainder(mean, hi).to(tl.float64)
    sxh = minus_remainder(sdyx, lo, sdy - count * g.to(tl.float64)) * invstd  # Σ(dz - g)·(x - mean)
    tl.store(sums_ptr + c, sdy, mask=write)
    tl.store(sums_ptr + C + c, sxh, mask=write)
    kk = invstd
    if HAS_W:
        kk = kk * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(tl.float64)
    a = -kk * invstd * sxh / count
    mean_dz = sdy / count
    gh = mean_dz.to(tl.float32)
    cc = dx_constant(kk, a, lo, mean_dz, gh)
    if WRITE_DW:
        tl.store(dw_ptr + c, narrow(sxh, dw_ptr.dtype.element_ty), mask=write)
    if WRITE_DB:
        tl.store(db_ptr + c, narrow(sdy, db_ptr.dtype.element_ty), mask=write)
    a32 = a.to(tl.float32)
    return hi, kk.to(tl.float32), a32, rounded_mean_constant(cc.to(tl.float32), a32, lo.to(tl.float32)), gh


@triton.jit
def grad_merge_kernel(
    part_ptr,  # (S, C, 2) float64 from a grad kernel
    stats_ptr,  # (3, C) float64: mean, M2, invstd of the forward
    w_ptr,  # weight (any float) if HAS_W
    sums_ptr,  # (2, C) float64 out: Σdz, Σdz·x̂
    coef_ptr,  # (5, C) float32 out: hi, kk, a, cc, gh of dx = kk·(dz - gh) + (a·(x - hi) + cc)
    dw_ptr, db_ptr,  # dweight/dbias outputs in their own dtypes, if WRITE_DW/WRITE_DB
    dy_ptr,  # dz's dy, for the shift g of CENTRED partials (centre_shift: base c·RUN, RUN, STRIDE, TOTAL)
    C, S, count: tl.float64, RUN, STRIDE, TOTAL,
    HAS_W: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, BLOCK_S: tl.constexpr,
    CENTRED: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) + tl.arange(0, 1)
    ok = c < C
    if CENTRED:
        g = centre_shift(dy_ptr, c.to(tl.int64) * RUN, ok, RUN, STRIDE, TOTAL)
    else:
        g = tl.zeros([1], dtype=tl.float32)
    hi, kk, a, cc, gh = merge_grad_sums(part_ptr, stats_ptr, w_ptr, sums_ptr, dw_ptr, db_ptr, c, ok, ok, g, C, S,
                                        count, HAS_W, WRITE_DW, WRITE_DB, BLOCK_S)  # fmt: skip
    tl.store(coef_ptr + c, hi, mask=ok)
    tl.store(coef_ptr + C + c, kk, mask=ok)
    tl.store(coef_ptr + 2 * C + c, a, mask=ok)
    tl.store(coef_ptr + 3 * C + c, cc, mask=ok)
    tl.store(coef_ptr + 4 * C + c, gh, mask=ok)
