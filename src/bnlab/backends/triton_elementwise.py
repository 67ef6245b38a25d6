"""Triton kernels of BN's elementwise phase: normalize (+ residual, ReLU, 1-bit mask) and dx.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

A dense input is viewed as R rows of K contiguous values: NCL (contiguous NCHW) has rows
n*C + c of the L positions of one channel (channel = row % C, one division per row); NLC
(channels innermost) has rows of the C channels (channel = position, no division at all).
Programs take [BLOCK_R, BLOCK_K] tiles: coalesced, and no per-element integer division, which
would make these memory-bound kernels compute-bound on a GPU. Per-channel coefficients are
(k, C) float32 rows written by the merge kernels. The ReLU mask pads each row to K8B = ceil(K/8)
bytes: bit k % 8 of byte row*K8B + k // 8 (BLOCK_K is a multiple of 8, so tiles own whole bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bnlab.backends.triton_mask import relu_masked
from bnlab.backends.triton_reduce import normalize_coefficients, store_coefficients


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
def normalize_kernel(
    x_ptr, y_ptr,  # input and output, same strides, R rows of K values
    coef_ptr,  # (3, C) float32: hi, scale, shift of y = (x - hi)·scale + shift
    res_ptr,  # residual added before the activation (HAS_RES), same strides as x
    mask_ptr,  # uint8 out (WRITE_MASK): bit of z > 0, rows of K8B bytes
    R, K, C, K8B,
    NCL: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok, k_ok = r < R, k < K
    ok = r_ok[:, None] & k_ok[None, :]
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    hi = _coef(coef_ptr, 0, r, k, r_ok, k_ok, C, NCL)
    scale = _coef(coef_ptr, 1, r, k, r_ok, k_ok, C, NCL)
    shift = _coef(coef_ptr, 2, r, k, r_ok, k_ok, C, NCL)
    z = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - hi) * scale + shift
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if WRITE_MASK:
        bits = tl.reshape(((z > 0) & ok).to(tl.int32), (BLOCK_R, BLOCK_K // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2).to(tl.uint8)
        col = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        tl.store(mask_ptr + r.to(tl.int64)[:, None] * K8B + col[None, :], packed, mask=r_ok[:, None] & (col < K8B)[None, :])
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grad_input_kernel(
    dy_ptr, x_ptr,  # upstream gradient and input, same strides
    mask_ptr,  # ReLU mask from normalize_kernel (HAS_MASK)
    coef_ptr,  # (4, C) float32: hi, kk, a, cc of dx = kk·dz + a·(x - hi) + cc
    dx_ptr,  # input gradient out (HAS_DX)
    dres_ptr,  # residual gradient out: dz (WRITE_DRES)
    R, K, C, K8B,
    NCL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok, k_ok = r < R, k < K
    ok = r_ok[:, None] & k_ok[None, :]
    offs = r.to(tl.int64)[:, None] * K + k[None, :]
    dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        dz = relu_masked(dz, mask_ptr, r.to(tl.int64) * K8B, r_ok, tl.program_id(1) * BLOCK_K, K, K8B, BLOCK_R, BLOCK_K)
    if WRITE_DRES:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=ok)
    if HAS_DX:
        hi = _coef(coef_ptr, 0, r, k, r_ok, k_ok, C, NCL)
        kk = _coef(coef_ptr, 1, r, k, r_ok, k_ok, C, NCL)
        a = _coef(coef_ptr, 2, r, k, r_ok, k_ok, C, NCL)
        cc = _coef(coef_ptr, 3, r, k, r_ok, k_ok, C, NCL)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (kk * dz + a * (x - hi) + cc).to(dx_ptr.dtype.element_ty), mask=ok)


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
def eval_coef_kernel(
    mean_ptr,  # (C,) running mean (any float), or the float64 mean (GIVEN_INVSTD)
    var_ptr,  # (C,) running variance (any float), or the float64 invstd (GIVEN_INVSTD)
    w_ptr, b_ptr,  # affine parameters if HAS_W / HAS_B
    coef_ptr,  # (3, C) float32 out: hi, scale, shift
    ok_ptr,  # uint8 out: 1 if no variance is negative, else 0 (not GIVEN_INVSTD)
    C, eps,
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
        tl.store(ok_ptr, (negative == 0).to(tl.uint8))
