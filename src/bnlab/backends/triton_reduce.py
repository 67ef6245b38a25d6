"""Triton kernels of BN's reduce phase: per-channel partial statistics and gradient sums, and their merge.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

Two layouts of a dense input, both without any per-element integer division (which would make a
memory-bound kernel compute-bound on a GPU):
- NCL (contiguous (N, C, L)): program (c, segment) reduces channel c over tiles of
  [BLOCK_N rows n, BLOCK_L positions l]; a segment is a range of tiles t, with (n-block, l-block)
  = divmod(t, LB) once per tile.
- NLC (rows of C contiguous channels: (N, C) inputs and channels-last): program (channel block,
  segment) reduces BLOCK_C channels over tiles of [BLOCK_M rows, BLOCK_C channels].
Segments let a few channels spread over the whole GPU; their partials are merged by a second,
per-channel kernel with Chan's rule, in float64.

Precision (DEVELOPERS.md): values are shifted by the channel's first value K before anything is
summed, and everything is accumulated in float64 (each lane its own sums of x - K and its
square; segments merged by Chan's rule): fp32 data at 1e3 ± 0.01 keeps its variance, fp32 data
near 1e18 has finite squares.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def narrow(value, dtype: tl.constexpr):
    """A float64 value in ``dtype``; a 16-bit dtype by way of float32, as torch's kernels round.

    Triton's interpreter turns float64 into bfloat16 or float16 by the integer value, not the
    float (1.0 -> 9e-41); rounding through float32 first is right in both and matches torch.
    """
    if dtype.primitive_bitwidth < 32:
        value = value.to(tl.float32)
    return value.to(dtype)


@triton.jit
def finite_or_zero(value):
    """value where finite, else 0: for the backward's remainder terms (mean_lo·Σ, the remainder of
    dy's mean), which correct a finite sum by less than its last bit; where a sum is ±inf the
    infinite terms' own signs are the exact answer's (bnlab.elementwise.finite_or_zero)."""
    return tl.where(tl.abs(value) < float("inf"), value, 0.0)


@triton.jit
def minus_remainder(total, lo, s):
    """total - lo·s in one rounding (as the compiler contracted it before this guard: the same
    bits), or total where lo·s is not finite (finite_or_zero)."""
    return tl.where(tl.abs(lo * s) < float("inf"), tl.fma(-lo, s, total), total)


@triton.jit
def dx_constant(kk, a, lo, mean_dz, gh):
    """cc of dx = kk·(dz - gh) + (a·(x - hi) + cc): the float64 remainders -kk·(mean(dz) - gh) and
    -a·lo, each dropped where not finite (an infinite Σdz or Σdz·x̂: finite_or_zero); the finite
    case's expression as before, so the compiler fuses it as before (the same bits)."""
    cc = -kk * (mean_dz - gh.to(tl.float64)) - a * lo
    return tl.where(tl.abs(cc) < float("inf"), cc,
                    finite_or_zero(-a * lo) + finite_or_zero(-kk * (mean_dz - gh.to(tl.float64))))


@triton.jit
def rounded_mean_constant(cc, a, lo):
    """cc of dx = kk·(dz - gh) + (a·(x - hi) + cc) as the dx kernels take it (float32): -lo (lo = mean -
    hi, float32) in channels where a is infinite, for rounded_mean_term; cc
    elsewhere. An infinite a makes a·(x - hi) ±inf or NaN wherever x - hi is not 0, so cc, a
    finite value (its remainders dropped: dx_constant), changes nothing there."""
    return tl.where(tl.abs(a) == float("inf"), -lo, cc)


@triton.jit
def rounded_mean_term(a, cc):
    """t of dx's a·((x - hi) + t) (float32; a and cc as rounded_mean_constant gives them, per
    channel): -lo (which cc then holds) where a is infinite, -0 elsewhere, with which (x - hi) + t
    is x - hi itself (signed zeros too: the same bits as before wherever a is finite).

    Why: an infinite dy makes Σdy or Σdy·x̂, and with them a, infinite. At x equal to hi (the mean
    rounded to float32), a·(x - hi) was a·0 = NaN, where the exact x - mean = -lo gives the
    float64 reference's ±inf (the CPU kernels' dx_at_rounded_means, docs/math.md §4.2); elsewhere
    x - hi has the sign of x - mean (no float32 lies between hi and the mean), and (x - hi) - lo
    keeps it. One add per value, t made per channel and -lo riding in cc: a sixth coefficient
    row, or a compare and select per value, made the sm_90 build of the input gradient's kernels
    spill (8-48 bytes in 1-4 variants, Triton 3.9)."""
    return tl.where(tl.abs(a) == float("inf"), cc, -0.0)


@triton.jit
def finite_shift(first):
    """The shift K (float64) from a channel's first value: 0 where that is infinite or NaN, so that
    x - K stays ±inf for an infinite value (torch.nn's mean is then ±inf) instead of inf - inf = NaN."""
    k = first.to(tl.float64)
    return tl.where(tl.abs(k) < float("inf"), k, 0.0)


@triton.jit
def chan_update(n_acc, mean_acc, m2_acc, d, ok, cnt):
    """Fold a tile of shifted values d (float64, 0 where not ok; cnt valid values per channel) into the
    running (count, mean, M2), axis 0 being the reduced axis. Where either mean is infinite the new
    mean is the weighted sum (inf stays inf; inf - inf in Chan's delta would make it NaN)."""
    t_mean = tl.sum(d, axis=0) / cnt
    dev = tl.where(ok, d - t_mean[None, :], 0.0)
    t_m2 = tl.sum(dev * dev, axis=0)
    n_new = n_acc + cnt
    delta = t_mean - mean_acc
    chan = mean_acc + delta * (cnt / n_new)
    weighted = (n_acc * mean_acc + cnt * t_mean) / n_new
    both_finite = (tl.abs(mean_acc) < float("inf")) & (tl.abs(t_mean) < float("inf"))
    return n_new, tl.where(both_finite, chan, weighted), m2_acc + t_m2 + delta * delta * (n_acc * cnt / n_new)


@triton.jit
def _store_part(part_ptr, s, c, C, c_ok, n_acc, mean_acc, m2_acc):
    out = part_ptr + (s * C + c) * 3
    tl.store(out, n_acc, mask=c_ok)
    tl.store(out + 1, mean_acc, mask=c_ok)
    tl.store(out + 2, m2_acc, mask=c_ok)


@triton.jit
def _store_sums(part_ptr, s, c, C, c_ok, cnt, s1, s2):
    """A segment's partial (count, mean, M2) from its shifted sums S1 = sum d and S2 = sum d^2:
    mean S1/n, M2 = S2 - S1·mean (float64; a rounding below zero is clamped, NaN is kept)."""
    mean = s1 / cnt
    m2 = s2 - s1 * mean
    _store_part(part_ptr, s, c, C, c_ok, cnt, mean, tl.where(m2 < 0.0, 0.0, m2))


@triton.jit
def stats_ncl_kernel(
    x_ptr,  # (N, C, L) contiguous, any float dtype
    part_ptr,  # (S, C, 3) float64 out: count, mean of (x - K), M2 per segment
    N, C, L, LB, TPS,  # LB = l-blocks per row, TPS = tiles per segment
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Each lane keeps its own float64 sums of d = x - K and d^2 over the segment's tiles, UNROLL
    tiles per step (their loads issued together: the bytes in flight, not the arithmetic, bound
    this kernel); the lanes are reduced across the program once, at the end. (A per-tile
    reduction, two block-wide sums and a Chan merge per tile, held every warp at a barrier: 57 %
    of copy bandwidth on an H200; one tile per step, 81 %.)"""
    c, s = tl.program_id(0), tl.program_id(1)
    base = x_ptr + c.to(tl.int64) * L
    shift = finite_shift(tl.load(base))  # K = x[0, c, 0]
    s1 = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float64)
    cnt = tl.full([], 0.0, tl.float64)
    t_end = tl.minimum((s + 1) * TPS, tl.cdiv(N, BLOCK_N) * LB)
    for t0 in range(s * TPS, t_end, UNROLL):
        for u in tl.static_range(UNROLL):
            t = t0 + u
            n0, l0 = (t // LB) * BLOCK_N, (t % LB) * BLOCK_L  # one division per tile, none per element
            n = n0 + tl.arange(0, BLOCK_N)
            l_ = l0 + tl.arange(0, BLOCK_L)
            n_lim = tl.where(t < t_end, N, 0)  # a step's tiles past the segment's end: all masked
            ok = (n < n_lim)[:, None] & (l_ < L)[None, :]
            x = tl.load(base + n.to(tl.int64)[:, None] * C * L + l_[None, :], mask=ok, other=0.0).to(tl.float64)
            d = tl.where(ok, x - shift, 0.0)
            s1 += d
            s2 += d * d
            size = tl.minimum(N - n0, BLOCK_N) * tl.minimum(L - l0, BLOCK_L)
            cnt += tl.where(t < t_end, size, 0).to(tl.float64)
    one = tl.zeros([1], dtype=tl.float64)
    cc = c + tl.arange(0, 1)
    _store_sums(part_ptr, s, cc, C, cc < C, one + cnt, one + tl.sum(tl.sum(s1, axis=1), axis=0),
                one + tl.sum(tl.sum(s2, axis=1), axis=0))  # fmt: skip


@triton.jit
def stats_nlc_kernel(
    x_ptr,  # (M, C) rows of contiguous channels, any float dtype
    part_ptr,  # (S, C, 3) float64 out
    M, C, SEG,  # rows, channels, rows per segment
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Per-lane float64 sums of d = x - K and d^2, UNROLL tiles of rows per step, reduced over the
    rows once at the end (as stats_ncl_kernel; the per-tile Chan merge ran at 25 % of copy
    bandwidth on an H200)."""
    cb, s = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    shift = finite_shift(tl.load(x_ptr + c, mask=c_ok, other=0.0))  # K = x[0, c]
    s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float64)
    start = s * SEG
    end = tl.minimum(start + SEG, M)
    for m0 in range(start, end, UNROLL * BLOCK_M):
        for u in tl.static_range(UNROLL):
            m = m0 + u * BLOCK_M + tl.arange(0, BLOCK_M)
            ok = (m < end)[:, None] & c_ok[None, :]
            x = tl.load(x_ptr + m.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float64)
            d = tl.where(ok, x - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
    cnt = (end - start).to(tl.float64) + tl.zeros([BLOCK_C], dtype=tl.float64)
    _store_sums(part_ptr, s, c, C, c_ok, cnt, tl.sum(s1, axis=0), tl.sum(s2, axis=0))


@triton.jit
def mean_remainder(mean, hi):
    """lo of bnlab.stats.split_mean, as float32: the float64 mean less hi, its rounding to float32,
    rounded to float32 (.to(tl.float64) where float64 arithmetic follows). The one definition the
    kernels share (the normalize and input-gradient coefficients, the rounded-mean fix-ups)."""
    return (mean - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(hi, scale, shift) of y = (x - hi)·scale + shift for float64 mean and invstd of channels c:
    hi the mean rounded to float32 and the rest of it (lo) folded into the shift, as
    bnlab.stats.split_mean, so that x - hi is exact near the mean. hi float32, the others float64."""
    hi = mean.to(tl.float32)
    lo = mean_remainder(mean, hi).to(tl.float64)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=ok, other=1.0).to(tl.float64)
    shift = -lo * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float64)
    return hi, scale, shift


@triton.jit
def store_coefficients(coef_ptr, C, c, ok, hi, scale, shift):
    """Rows hi, scale, shift of the (3, C) float32 coefficients."""
    tl.store(coef_ptr + c, hi, mask=ok)
    tl.store(coef_ptr + C + c, scale.to(tl.float32), mask=ok)
    tl.store(coef_ptr + 2 * C + c, shift.to(tl.float32), mask=ok)


@triton.jit
def stats_merge_kernel(
    part_ptr,  # (S, C, 3) float64 from a stats kernel
    x_ptr,  # the input, for the shift K = x[0, c, 0] at c * sC
    stats_ptr,  # (3, C) float64 out: mean, M2, invstd
    coef_ptr,  # (3, C) float32 out: hi, scale, shift of y = (x - hi)·scale + shift
    w_ptr, b_ptr,  # weight, bias (any float)
    C, S, sC, eps: tl.float64,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_S: tl.constexpr,
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
    # (the offset in int64, as the statistics kernels read K: c·sC passes 2**31 in large inputs)
    mean = finite_shift(tl.load(x_ptr + tl.cast(c, tl.int64) * sC)) + mean_d
    invstd = 1.0 / tl.sqrt(m2 / n + eps)
    tl.store(stats_ptr + c, mean)
    tl.store(stats_ptr + C + c, m2)
    tl.store(stats_ptr + 2 * C + c, invstd)
    hi, scale, shift = normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, True, HAS_W, HAS_B)
    store_coefficients(coef_ptr, C, c, True, hi, scale, shift)


@triton.jit
def nonfinite_count(mean, var, ok):
    """How many channels (of those ok) have a NaN or infinite mean or variance (the guard's test)."""
    bad = ok & ((mean != mean) | (var != var) | (tl.abs(mean) == float("inf")) | (tl.abs(var) == float("inf")))
    return tl.sum(tl.where(bad, 1, 0), axis=0)


@triton.jit
def blend_running(rm_ptr, rv_ptr, c, ok, mean, var, factor):
    """running = running·(1 - factor) + batch·factor for the channels c (float64 arithmetic, stored
    in the buffers' dtypes)."""
    rm = tl.load(rm_ptr + c, mask=ok, other=0.0)
    rv = tl.load(rv_ptr + c, mask=ok, other=0.0)
    tl.store(rm_ptr + c, narrow(rm.to(tl.float64) * (1.0 - factor) + mean * factor, rm.dtype), mask=ok)
    tl.store(rv_ptr + c, narrow(rv.to(tl.float64) * (1.0 - factor) + var * factor, rv.dtype), mask=ok)


@triton.jit
def counted_factor(nbt_ptr, momentum, COUNT: tl.constexpr, CUMULATIVE: tl.constexpr):
    """The running averages' factor: momentum, or 1/num_batches_tracked after counting this batch
    (CUMULATIVE); counts the batch in num_batches_tracked if COUNT."""
    factor = momentum + tl.zeros([], tl.float64)  # a float64 scalar, compiled or interpreted
    if COUNT:
        tracked = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, tracked)
        if CUMULATIVE:
            factor = 1.0 / tracked.to(tl.float64)
    return factor


@triton.jit
def update_running(
    stats_ptr,  # (3, C) float64: mean, M2, invstd
    rm_ptr, rv_ptr,  # running mean/var (any float) if UPDATE
    nbt_ptr,  # num_batches_tracked (int64) if COUNT
    C, count, momentum,
    UPDATE: tl.constexpr, COUNT: tl.constexpr, CUMULATIVE: tl.constexpr, GUARD: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The running averages and the counter, by one program for the whole layer: the non-finite
    guard needs every channel before any update (bnlab.stats.update_running_stats_: one NaN/Inf
    mean or variance skips the batch, counter too). Run by the first program of the normalize
    kernel that follows the merge: one launch fewer than a kernel of its own."""
    accepted = tl.full([], 1, tl.int32)
    if GUARD and UPDATE and count > 1:
        for c0 in range(0, C, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < C
            mean = tl.load(stats_ptr + c, mask=ok, other=0.0)
            # M2 for the variance M2/(count - 1): a quotient by 1 or more is finite where M2 is, and
            # a division fewer (a float64 one is a subroutine call, whose saved registers made the
            # bf16 residual variant, as a GPU specializes it, spill 20 bytes on sm_90)
            m2 = tl.load(stats_ptr + C + c, mask=ok, other=0.0)
            accepted = accepted & (nonfinite_count(mean, m2, ok) == 0).to(tl.int32)
    if accepted != 0:
        factor = counted_factor(nbt_ptr, momentum, COUNT, CUMULATIVE)
        if UPDATE and count > 1:
            for c0 in range(0, C, BLOCK):
                c = c0 + tl.arange(0, BLOCK)
                ok = c < C
                mean = tl.load(stats_ptr + c, mask=ok, other=0.0)
                var = tl.load(stats_ptr + C + c, mask=ok, other=0.0) / (count - 1.0)
                blend_running(rm_ptr, rv_ptr, c, ok, mean, var, factor)
