"""Triton kernels of BN's elementwise phase: normalize (+ residual, ReLU, 1-bit mask), eval and dx.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

A dense input is viewed as R rows of K contiguous values: NCL (contiguous NCHW) has rows
n*C + c of the L positions of one channel (channel = row % C, one division per row); NLC
(channels innermost) has rows of the C channels (channel = position, no division at all).
Programs take [BLOCK_R, BLOCK_K] tiles: coalesced, and no per-element integer division, which
would make these memory-bound kernels compute-bound on a GPU. Per-channel coefficients are
(k, C) float32 rows written by the merge kernels, or, in eval_kernel, computed by each tile for its
own channels. The ReLU mask pads each row to K8B = ceil(K/8)
bytes: bit k % 8 of byte row*K8B + k // 8 (BLOCK_K is a multiple of 8, so tiles own whole bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bnlab.backends.triton_grad import centre_shift, merge_grad_sums
from bnlab.backends.triton_mask import relu_masked
from bnlab.backends.triton_reduce import normalize_coefficients, store_coefficients, rounded_mean_term, update_running


@triton.jit
def _coef(coef_ptr, index, r, k, r_ok, k_ok, C, NCL: tl.constexpr):
    """Row ``index`` of the (·, C) coefficients, broadcast over a [BLOCK_R, BLOCK_K] tile."""
    # One return: compiled Triton types every return of a function alike, even under a constexpr
    # branch ([BLOCK_R, 1] and [1, BLOCK_K] differ), which the interpreter does not check.
    if NCL:
        row = tl.load(coef_ptr + index * C + r % C, mask=r_ok, other=0.0)[:, None]
    else:
        row = tl.load(coef_ptr + index * C + k, mask=k_ok, other=0.0)[None, :]
    return row


@triton.jit
def _tile(R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile: rows r, positions k, their masks, the tile's mask and its offsets."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok, k_ok = r < R, k < K
    return r, k, r_ok, k_ok, r_ok[:, None] & k_ok[None, :], r.to(tl.int64)[:, None] * K + k[None, :]


@triton.jit
def _activate_store(z, y_ptr, res_ptr, mask_ptr, offs, ok, r, r_ok, K8B,
                    HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_MASK: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Store the tile z (float32) of y, after the residual (HAS_RES) and ReLU (RELU), writing the
    bits of not z <= 0 (WRITE_MASK)."""
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        # NaN stays NaN, as torch.relu (tl.maximum's default returned the other operand, 0)
        z = tl.where(z <= 0, 0.0, z)
    if WRITE_MASK:  # set with RELU only
        # not z <= 0 before the ReLU, i.e. its output is not 0: z > 0, and NaN, where torch's ReLU
        # backward passes dy (threshold_backward). (Tested after the ReLU: one comparison, as the
        # z > 0 of before; two spilled registers of normalize_kernel on sm_90.)
        bits = tl.reshape(((z != 0) & ok).to(tl.int32), (BLOCK_R, BLOCK_K // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        col = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        tl.store(mask_ptr + r.to(tl.int64)[:, None] * K8B + col[None, :], packed, mask=r_ok[:, None] & (col < K8B)[None, :])
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr,  # input and output, same strides, R rows of K values
    coef_ptr,  # (3, C) float32: hi, scale, shift of y = (x - hi)·scale + shift
    res_ptr,  # residual added before the activation (HAS_RES), same strides as x
    mask_ptr,  # uint8 out (WRITE_MASK): bit of not z <= 0, rows of K8B bytes
    stats_ptr, rm_ptr, rv_ptr, nbt_ptr,  # the running averages' arguments (RUNNING): update_running's
    R, K, C, K8B, count: tl.float64, momentum: tl.float64,
    NCL: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_MASK: tl.constexpr,
    RUNNING: tl.constexpr, UPDATE: tl.constexpr, COUNT: tl.constexpr, CUMULATIVE: tl.constexpr,
    GUARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RUN: tl.constexpr,
):  # fmt: skip
    """y = (x - hi)·scale + shift (+ residual, ReLU, mask) by tiles. With RUNNING, the first program
    also updates the running averages from the merged statistics (the merge kernel ran before:
    they are complete), which saves the forward a launch of its own for them."""
    r, k, r_ok, k_ok, ok, offs = _tile(R, K, BLOCK_R, BLOCK_K)
    hi = _coef(coef_ptr, 0, r, k, r_ok, k_ok, C, NCL)
    scale = _coef(coef_ptr, 1, r, k, r_ok, k_ok, C, NCL)
    shift = _coef(coef_ptr, 2, r, k, r_ok, k_ok, C, NCL)
    z = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - hi) * scale + shift
    _activate_store(z, y_ptr, res_ptr, mask_ptr, offs, ok, r, r_ok, K8B, HAS_RES, RELU, WRITE_MASK, BLOCK_R, BLOCK_K)
    if RUNNING:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            update_running(stats_ptr, rm_ptr, rv_ptr, nbt_ptr, C, count, momentum, UPDATE, COUNT, CUMULATIVE, GUARD,
                           BLOCK_RUN)  # fmt: skip


@triton.jit
def grad_input_kernel(
    dy_ptr, x_ptr,  # upstream gradient and input, same strides
    mask_ptr,  # ReLU mask from normalize_kernel (HAS_MASK)
    coef_ptr,  # (5, C) float32: hi, kk, a, cc, gh of dx = kk·(dz - gh) + (a·(x - hi) + cc) (_store_dx)
    dx_ptr,  # input gradient out (HAS_DX)
    dres_ptr,  # residual gradient out: dz (WRITE_DRES)
    R, K, C, K8B,
    NCL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    r, k, r_ok, k_ok, ok, offs = _tile(R, K, BLOCK_R, BLOCK_K)
    dz = _masked_dz(dy_ptr, mask_ptr, dres_ptr, r, r_ok, ok, offs, K, K8B, HAS_MASK, WRITE_DRES, BLOCK_R, BLOCK_K)
    if HAS_DX:
        hi = _coef(coef_ptr, 0, r, k, r_ok, k_ok, C, NCL)
        kk = _coef(coef_ptr, 1, r, k, r_ok, k_ok, C, NCL)
        a = _coef(coef_ptr, 2, r, k, r_ok, k_ok, C, NCL)
        cc = _coef(coef_ptr, 3, r, k, r_ok, k_ok, C, NCL)
        gh = _coef(coef_ptr, 4, r, k, r_ok, k_ok, C, NCL)
        _store_dx(dx_ptr, x_ptr, offs, ok, dz, hi, kk, a, cc, gh, rounded_mean_term(a, cc))


@triton.jit
def _masked_dz(dy_ptr, mask_ptr, dres_ptr, r, r_ok, ok, offs, K, K8B, HAS_MASK: tl.constexpr,
               WRITE_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The tile of dz (float32): dy, through the ReLU mask (HAS_MASK); stored as the residual's
    gradient (WRITE_DRES)."""
    dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        dz = relu_masked(dz, mask_ptr, r.to(tl.int64) * K8B, r_ok, tl.program_id(1) * BLOCK_K, K, K8B, BLOCK_R, BLOCK_K)
    if WRITE_DRES:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=ok)
    return dz


@triton.jit
def _store_dx(dx_ptr, x_ptr, offs, ok, dz, hi, kk, a, cc, gh, t):
    """dx = kk·(dz - gh) + (a·((x - hi) + t) + cc) over the tile (float32 coefficients broadcast to
    it; cc as triton_reduce.rounded_mean_constant and t as rounded_mean_term give them)."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (kk * (dz - gh) + (a * ((x - hi) + t) + cc)).to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grad_input_merged_kernel(
    dy_ptr, x_ptr, mask_ptr, dx_ptr,  # as grad_input_kernel's; NCL rows only
    part_ptr, stats_ptr, w_ptr, sums_ptr, dw_ptr, db_ptr,  # as grad_merge_kernel's
    R, K, C, K8B, S, count: tl.float64,
    STRIDE, TOTAL,  # C·K and R/C·K for centre_shift, from the host (grad_ncl_kernel says why)
    HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, CENTRED: tl.constexpr,
):  # fmt: skip
    """grad_merge_kernel and grad_input_kernel in one launch, for NCL tiles of few rows: each tile
    merges its rows' channel partials itself (BLOCK_R x S float64 pairs, from the L2), and the
    tiles of sample 0's rows in the first column write each channel's sums, dweight and dbias once.
    Always dx; never the residual's gradient (with it, the sm_90 build of the variant with the
    mask, dweight and dbias spilled 16 bytes: triton_ops.backward takes the two kernels then)."""
    r, k, r_ok, k_ok, ok, offs = _tile(R, K, BLOCK_R, BLOCK_K)
    c = r % C
    # rows of sample 0 (r < C) in the first column of tiles; written without a scalar & vector mask,
    # which Triton 3.9's interpreter cannot store under
    write = r_ok & (r + tl.program_id(1) * C < C)
    if CENTRED:  # channel c's shift, from its values from sample 0, position 0 on (c·K)
        g = centre_shift(dy_ptr, c.to(tl.int64) * K, r_ok, K, STRIDE, TOTAL)  # (grad_ncl_kernel's)
    else:
        g = tl.zeros([BLOCK_R], dtype=tl.float32)
    hi, kk, a, cc, gh = merge_grad_sums(part_ptr, stats_ptr, w_ptr, sums_ptr, dw_ptr, db_ptr, c, r_ok, write, g, C,
                                        S, count, HAS_W, WRITE_DW, WRITE_DB, BLOCK_S)  # fmt: skip
    dz = _masked_dz(dy_ptr, mask_ptr, dx_ptr, r, r_ok, ok, offs, K, K8B, HAS_MASK, False, BLOCK_R, BLOCK_K)
    t = rounded_mean_term(a, cc)
    _store_dx(dx_ptr, x_ptr, offs, ok, dz, hi[:, None], kk[:, None], a[:, None], cc[:, None], gh[:, None], t[:, None])


@triton.jit
def fixed_statistics(mean_ptr, var_ptr, c, ok, eps, GIVEN_INVSTD: tl.constexpr):
    """(mean, invstd, negative) of channels c for eval: float64 mean and 1/sqrt(var + eps) of the
    running statistics (any float) and how many of those variances are negative; or, with
    GIVEN_INVSTD, a given float64 mean and invstd (and no variance to count)."""
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(tl.float64)
    if GIVEN_INVSTD:
        invstd = tl.load(var_ptr + c, mask=ok, other=1.0).to(tl.float64)
        negative = tl.full([], 0, tl.int32)
    else:
        var = tl.load(var_ptr + c, mask=ok, other=1.0).to(tl.float64)
        negative = tl.sum(tl.where(var < 0, 1, 0), axis=0).to(tl.int32)
        invstd = 1.0 / tl.sqrt(var + eps)
    return mean, invstd, negative


@triton.jit
def flag_negative(ok_ptr, negative):
    """Clear the negative-variance flag if ``negative`` counts any, and only then: the caller sets
    it to 1 before the launch, and on a GPU one flag serves every eval call on a stream (see
    triton_ops.variance_flag), so that no call may set it back once one has cleared it."""
    tl.store(ok_ptr, tl.full([], 0, tl.uint8), mask=negative != 0)


@triton.jit
def eval_coef_kernel(
    mean_ptr,  # (C,) running mean (any float), or the float64 mean (GIVEN_INVSTD)
    var_ptr,  # (C,) running variance (any float), or the float64 invstd (GIVEN_INVSTD)
    w_ptr, b_ptr,  # affine parameters if HAS_W / HAS_B
    coef_ptr,  # (3, C) float32 out: hi, scale, shift
    ok_ptr,  # uint8 flag, set to 0 if a variance is negative, else left as it is (not GIVEN_INVSTD)
    C, eps: tl.float64,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, GIVEN_INVSTD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program over every channel: it also decides whether any running variance is negative,
    which the caller asserts asynchronously from ok_ptr (one more launch, instead of the four of
    torch's compare, any, not and assert)."""
    negative = tl.full([], 0, tl.int32)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < C
        mean, invstd, block_negative = fixed_statistics(mean_ptr, var_ptr, c, ok, eps, GIVEN_INVSTD)
        negative += block_negative
        hi, scale, shift = normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, ok, HAS_W, HAS_B)
        store_coefficients(coef_ptr, C, c, ok, hi, scale, shift)
    if not GIVEN_INVSTD:
        flag_negative(ok_ptr, negative)


@triton.jit
def _fixed_coefficients(mean_ptr, var_ptr, w_ptr, b_ptr, r, k, r_ok, k_ok, C, eps,
                        NCL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        GIVEN_INVSTD: tl.constexpr):  # fmt: skip
    """(hi, scale, shift) float32 for a tile's channels, computed from the statistics as
    eval_coef_kernel computes them (the same bits), broadcast over a [BLOCK_R, BLOCK_K] tile."""
    if NCL:
        c, c_ok = r % C, r_ok
    else:
        c, c_ok = k, k_ok
    mean, invstd, _negative = fixed_statistics(mean_ptr, var_ptr, c, c_ok, eps, GIVEN_INVSTD)
    hi, scale, shift = normalize_coefficients(mean, invstd, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B)
    scale, shift = scale.to(tl.float32), shift.to(tl.float32)
    # one return for both layouts (see _coef)
    if NCL:
        hi, scale, shift = hi[:, None], scale[:, None], shift[:, None]
    else:
        hi, scale, shift = hi[None, :], scale[None, :], shift[None, :]
    return hi, scale, shift


@triton.jit
def eval_kernel(
    x_ptr, y_ptr,  # input and output, same strides, R rows of K values
    mean_ptr, var_ptr, w_ptr, b_ptr, ok_ptr,  # as eval_coef_kernel
    res_ptr,  # residual added before the activation (HAS_RES)
    R, K, C, eps: tl.float64,
    NCL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, GIVEN_INVSTD: tl.constexpr,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eval in one launch: each tile computes its own channels' coefficients (eval_coef_kernel's
    float64 arithmetic, per row for NCL, per position for NLC), and the first program also clears
    the negative-variance flag if any channel's variance is negative. For tiles with few channels (the launcher's
    eval_one_launch): a float64 square root per 64 values or fewer, instead of a second launch."""
    r, k, r_ok, k_ok, ok, offs = _tile(R, K, BLOCK_R, BLOCK_K)
    hi, scale, shift = _fixed_coefficients(mean_ptr, var_ptr, w_ptr, b_ptr, r, k, r_ok, k_ok, C, eps, NCL, HAS_W,
                                           HAS_B, GIVEN_INVSTD)  # fmt: skip
    z = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - hi) * scale + shift
    _activate_store(z, y_ptr, res_ptr, y_ptr, offs, ok, r, r_ok, 0, HAS_RES, RELU, False, BLOCK_R, BLOCK_K)
    if not GIVEN_INVSTD:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            negative = tl.full([], 0, tl.int32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                var = tl.load(var_ptr + c, mask=c < C, other=1.0).to(tl.float64)
                negative += tl.sum(tl.where(var < 0, 1, 0), axis=0).to(tl.int32)
            flag_negative(ok_ptr, negative)
