"""Triton kernels for inputs small enough for one program: one launch per forward, backward or eval.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

On a GPU a (256, 100) activation is read in a microsecond; what a training step of it costs is
the host's time, and each kernel launch is a few microseconds of it. The general path launches
three kernels forward (partial statistics, merge, normalize with the running averages) and three backward
(partial sums, merge, input gradient), so that large tensors spread over every multiprocessor.
For rows of channels (NLC: (N, C) inputs and channels-last) with C <= 1024 and few values
(triton_ops.SMALL_NUMEL), one program does all of it (and eval's two kernels' work too): it walks
the rows once for the statistics (shifted, Chan-merged in float64 as stats_nlc_kernel with one
segment), keeps every channel's
statistics and coefficients in registers, updates the running averages under the non-finite
guard (which needs every channel: here they all are in the program), and walks the rows again to
write y. The backward likewise: Σdz and Σdz·(x - hi) (float32 within a tile, float64 across), the
coefficients of docs/math.md §3, dweight and dbias, then dx. The same formulas as the general
path's kernels, so results agree with it to rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bnlab.backends.triton_elementwise import fixed_statistics, flag_negative
from bnlab.backends.triton_grad import centre_shift, centred_exactly, minus_lo
from bnlab.backends.triton_reduce import (
    blend_running,
    chan_update,
    counted_factor,
    dx_constant,
    finite_shift,
    mean_remainder,
    minus_remainder,
    narrow,
    nonfinite_count,
    normalize_coefficients,
    rounded_mean_constant,
    rounded_mean_term,
    store_coefficients,
)


@triton.jit
def _rows(m0, M, C, c, c_ok, BLOCK_M: tl.constexpr):
    """(mask, offsets) of the tile of rows [m0, m0 + BLOCK_M) of an (M, C) tensor, channels c."""
    m = m0 + tl.arange(0, BLOCK_M)
    return (m < M)[:, None] & c_ok[None, :], m.to(tl.int64)[:, None] * C + c[None, :]


@triton.jit
def small_forward_kernel(
    x_ptr, y_ptr,  # (M, C) rows of contiguous channels
    stats_ptr,  # (3, C) float64 out: mean, M2, invstd
    coef_ptr,  # (3, C) float32 out: hi, scale, shift of y = (x - hi)·scale + shift
    w_ptr, b_ptr,  # weight, bias (any float) if HAS_W / HAS_B
    rm_ptr, rv_ptr, nbt_ptr,  # running mean/var if UPDATE, num_batches_tracked if COUNT
    M, C, count: tl.float64, eps: tl.float64, momentum: tl.float64,  # count: M as a float
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, COUNT: tl.constexpr,
    CUMULATIVE: tl.constexpr, GUARD: tl.constexpr, WANT_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    shift = finite_shift(tl.load(x_ptr + c, mask=c_ok, other=0.0))  # K = x[0, c]
    n_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2_acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for m0 in range(0, M, BLOCK_M):
        ok, offs = _rows(m0, M, C, c, c_ok, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float64)
        cnt = tl.minimum(M - m0, BLOCK_M).to(tl.float64)
        n_acc, mean_acc, m2_acc = chan_update(n_acc, mean_acc, m2_acc, tl.where(ok, x - shift[None, :], 0.0), ok, cnt)
    mean = shift + mean_acc
    invstd = 1.0 / tl.sqrt(m2_acc / count + eps)
    tl.store(stats_ptr + c, mean, mask=c_ok)
    tl.store(stats_ptr + C + c, m2_acc, mask=c_ok)
    tl.store(stats_ptr + 2 * C + c, invstd, mask=c_ok)
    hi, scale, shift_out = normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B)
    store_coefficients(coef_ptr, C, c, c_ok, hi, scale, shift_out)
    # Running averages (as triton_reduce.update_running, every channel at hand).
    if UPDATE or COUNT:
        var = m2_acc / (count - 1.0)
        accepted = tl.full([], 1, tl.int32)
        if GUARD and UPDATE and count > 1:
            accepted = accepted & (nonfinite_count(mean, var, c_ok) == 0).to(tl.int32)
        if accepted != 0:
            factor = counted_factor(nbt_ptr, momentum, COUNT, CUMULATIVE)
            if UPDATE and count > 1:
                blend_running(rm_ptr, rv_ptr, c, c_ok, mean, var, factor)
    if WANT_Y:
        _normalize_rows(x_ptr, y_ptr, M, C, c, c_ok, hi, scale, shift_out, BLOCK_M)


@triton.jit
def _normalize_rows(x_ptr, y_ptr, M, C, c, c_ok, hi, scale, shift, BLOCK_M: tl.constexpr):
    """y = (x - hi)·scale + shift over every row (hi float32; scale, shift float64, used in float32)."""
    a = scale.to(tl.float32)[None, :]
    b = shift.to(tl.float32)[None, :]
    h = hi[None, :]
    for m0 in range(0, M, BLOCK_M):
        ok, offs = _rows(m0, M, C, c, c_ok, BLOCK_M)
        z = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - h) * a + b
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def small_eval_kernel(
    x_ptr, y_ptr,  # (M, C) rows of contiguous channels
    mean_ptr,  # (C,) running mean (any float), or the float64 mean (GIVEN_INVSTD)
    var_ptr,  # (C,) running variance (any float), or the float64 invstd (GIVEN_INVSTD)
    w_ptr, b_ptr,  # affine parameters if HAS_W / HAS_B
    ok_ptr,  # uint8 flag, set to 0 if a variance is negative, else left as it is (not GIVEN_INVSTD)
    M, C, eps: tl.float64,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, GIVEN_INVSTD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = BN(x) with fixed statistics in one launch: eval_coef_kernel and normalize_kernel's work,
    the coefficients kept in registers."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, invstd, negative = fixed_statistics(mean_ptr, var_ptr, c, c_ok, eps, GIVEN_INVSTD)
    if not GIVEN_INVSTD:
        flag_negative(ok_ptr, negative)
    hi, scale, shift = normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B)
    _normalize_rows(x_ptr, y_ptr, M, C, c, c_ok, hi, scale, shift, BLOCK_M)


@triton.jit
def _infinite_terms(dy_ptr, x_ptr, M, C, c, c_ok, hi, nlo, BLOCK_M: tl.constexpr):
    """Σ dz·(x - mean) over the infinite dz of channels c, float64 [BLOCK_C]: x - mean as
    centred_exactly takes it (-lo where x = hi). (dz - g0 is as infinite as dz.)"""
    acc = tl.zeros(hi.shape, dtype=tl.float64)
    for m0 in range(0, M, BLOCK_M):
        ok, offs = _rows(m0, M, C, c, c_ok, BLOCK_M)
        dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xc = centred_exactly(x, hi[None, :], nlo[None, :], dz)
        acc += tl.sum(tl.where(ok & (tl.abs(dz) == float("inf")), dz * xc, 0.0), axis=0).to(tl.float64)
    return acc


@triton.jit
def small_backward_kernel(
    dy_ptr, x_ptr,  # (M, C) rows of contiguous channels, same strides
    stats_ptr,  # (3, C) float64: mean, (unused), invstd of the forward
    w_ptr,  # weight (any float) if HAS_W
    dx_ptr,  # input gradient out if HAS_DX
    sums_ptr,  # (2, C) float64 out: Σdz, Σdz·x̂
    dw_ptr, db_ptr,  # dweight/dbias outputs in their own dtypes, if WRITE_DW/WRITE_DB
    M, C, count: tl.float64,  # count: M as a float
    HAS_W: tl.constexpr, HAS_DX: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CENTRED: tl.constexpr,
):  # fmt: skip
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    hi = tl.load(stats_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    acc_dy = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_dyx = tl.zeros([BLOCK_C], dtype=tl.float64)
    # Σdz sums dz - g0, g0 the first row's dz (0 where not finite), and adds M·g0 after: a float32
    # tile sum of a constant gradient is then exact, and so its mean (the CPU kernels' grad_shift).
    # Rows past M load g0 itself, so that their dz - g0 is 0 without a select (a select there
    # made the sm_90 build spill 24 bytes). (Training refuses batches of fewer than two values
    # per channel: row 0 exists.)
    if CENTRED:  # the batch's own mean: g0 near dy's mean, or 0 (triton_grad's centre_shift), in
        # dy's dtype, so that the rows past M still load g0 itself
        g0 = centre_shift(dy_ptr, c, c_ok, 1, C, M).to(dy_ptr.dtype.element_ty)
    else:
        g0 = tl.load(dy_ptr + c, mask=c_ok, other=0.0)
        g0 = tl.where(tl.abs(g0.to(tl.float32)) < float("inf"), g0, tl.zeros_like(g0))
    for m0 in range(0, M, BLOCK_M):
        ok, offs = _rows(m0, M, C, c, c_ok, BLOCK_M)
        dz = tl.load(dy_ptr + offs, mask=ok, other=g0[None, :]).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # fp32 within a tile, float64 across tiles (one program over few rows: no lanes to keep)
        d = dz - g0.to(tl.float32)[None, :]
        acc_dy += tl.sum(d, axis=0).to(tl.float64)
        if CENTRED:  # the batch's own mean: Σ(dz - g0)·(x - mean) (triton_grad's CENTRED)
            dz = d
        acc_dyx += tl.sum(tl.where(ok, dz * (x - hi[None, :]), 0.0), axis=0).to(tl.float64)
    shifted = acc_dy  # Σ(dz - g0)
    acc_dy = shifted + count * g0.to(tl.float64)
    # An infinite dz where x = hi added inf·0 = NaN to the products' sum (triton_grad's
    # centred_exactly): such a channel (Σdz ±inf, the sum NaN) is summed again from its infinite
    # terms, with -lo for x - hi where it is 0. After the loop and only then: -lo held through it
    # made four variants of the sm_90 build spill 8 bytes.
    redo = (tl.abs(acc_dy) == float("inf")) & (acc_dyx != acc_dyx)
    if tl.max(redo.to(tl.int32), axis=0) > 0:
        nlo = minus_lo(stats_ptr, c, hi, c_ok)
        acc_dyx = tl.where(redo, _infinite_terms(dy_ptr, x_ptr, M, C, c, c_ok, hi, nlo, BLOCK_M), acc_dyx)
    # Loaded after the loop: held through it, the float64 mean and invstd made the sm_90 build of
    # the bf16 centred sums (Triton 3.9's ptxas flags) spill 8 bytes.
    mean = tl.load(stats_ptr + c, mask=c_ok, other=0.0)
    invstd = tl.load(stats_ptr + 2 * C + c, mask=c_ok, other=0.0)
    lo = mean_remainder(mean, hi).to(tl.float64)
    # The coefficients of dx = kk·(dz - gh) + (a·(x - hi) + cc) (as merge_grad_sums).
    if CENTRED:
        sxh = minus_remainder(acc_dyx, lo, shifted) * invstd
    else:
        sxh = minus_remainder(acc_dyx, lo, acc_dy) * invstd
    tl.store(sums_ptr + c, acc_dy, mask=c_ok)
    tl.store(sums_ptr + C + c, sxh, mask=c_ok)
    if WRITE_DW:
        tl.store(dw_ptr + c, narrow(sxh, dw_ptr.dtype.element_ty), mask=c_ok)
    if WRITE_DB:
        tl.store(db_ptr + c, narrow(acc_dy, db_ptr.dtype.element_ty), mask=c_ok)
    if HAS_DX:
        kk = invstd
        if HAS_W:
            kk = kk * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(tl.float64)
        a = -kk * invstd * sxh / count
        mean_dz = acc_dy / count
        gh = mean_dz.to(tl.float32)
        cc = dx_constant(kk, a, lo, mean_dz, gh)
        a32 = a.to(tl.float32)
        k1, k2, h, k4 = kk.to(tl.float32)[None, :], a32[None, :], hi[None, :], gh[None, :]
        cc32 = rounded_mean_constant(cc.to(tl.float32), a32, lo.to(tl.float32))
        k3, t = cc32[None, :], rounded_mean_term(a32, cc32)[None, :]
        for m0 in range(0, M, BLOCK_M):
            ok, offs = _rows(m0, M, C, c, c_ok, BLOCK_M)
            dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, (k1 * (dz - k4) + (k2 * ((x - h) + t) + k3)).to(dx_ptr.dtype.element_ty), mask=ok)
