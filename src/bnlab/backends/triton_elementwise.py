"""Triton kernels of BN's elementwise phase: normalize (+ residual, ReLU, 1-bit mask) and dx.

Imported only by bnlab.backends.triton_ops (and the tests), never by ``import bnlab``.

The kernels run flat over the storage of a dense tensor (offset o in [0, numel)): every program
reads and writes BLOCK consecutive elements (fully coalesced, any memory format), and finds each
element's channel as (o // CDIV) % C (CDIV = L for contiguous NCHW, 1 for channels-last, where
channels are innermost). Per-channel coefficients (a few (C,) float32 rows written by the merge
kernels) are gathered from cache. The ReLU mask holds bit o % 8 of byte o // 8 for element o.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _channel(o, C, CDIV):
    return (o // CDIV) % C


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr,  # input and output, same strides
    coef_ptr,  # (3, C) float32: hi, scale, shift of y = (x - hi)·scale + shift
    res_ptr,  # residual to add before the activation (HAS_RES), same strides as x
    mask_ptr,  # uint8 out, 1 bit per element: z > 0 (WRITE_MASK)
    numel, C, CDIV,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    ok = o < numel
    c = _channel(o, C, CDIV)
    hi = tl.load(coef_ptr + c, mask=ok, other=0.0)
    scale = tl.load(coef_ptr + C + c, mask=ok, other=0.0)
    shift = tl.load(coef_ptr + 2 * C + c, mask=ok, other=0.0)
    z = (tl.load(x_ptr + o, mask=ok, other=0.0).to(tl.float32) - hi) * scale + shift
    if HAS_RES:
        z += tl.load(res_ptr + o, mask=ok, other=0.0).to(tl.float32)
    if WRITE_MASK:  # BLOCK is a multiple of 8, so each program owns whole bytes
        bits = tl.reshape((z > 0).to(tl.int32), (BLOCK // 8, 8))
        packed = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
        byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + byte, packed, mask=byte < (numel + 7) // 8)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + o, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grad_input_kernel(
    dy_ptr, x_ptr,  # upstream gradient and input, same strides
    mask_ptr,  # ReLU mask from normalize_kernel (HAS_MASK)
    coef_ptr,  # (4, C) float32: hi, kk, a, cc of dx = kk·dz + a·(x - hi) + cc
    dx_ptr,  # input gradient out (HAS_DX)
    dres_ptr,  # residual gradient out, dz (WRITE_DRES)
    numel, C, CDIV,
    HAS_MASK: tl.constexpr, HAS_DX: tl.constexpr, WRITE_DRES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    ok = o < numel
    dz = tl.load(dy_ptr + o, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        bits = tl.load(mask_ptr + o // 8, mask=ok, other=0).to(tl.int32)
        dz = tl.where(((bits >> (o % 8)) & 1) != 0, dz, 0.0)
    if WRITE_DRES:
        tl.store(dres_ptr + o, dz.to(dres_ptr.dtype.element_ty), mask=ok)
    if HAS_DX:
        c = _channel(o, C, CDIV)
        hi = tl.load(coef_ptr + c, mask=ok, other=0.0)
        kk = tl.load(coef_ptr + C + c, mask=ok, other=0.0)
        a = tl.load(coef_ptr + 2 * C + c, mask=ok, other=0.0)
        cc = tl.load(coef_ptr + 3 * C + c, mask=ok, other=0.0)
        x = tl.load(x_ptr + o, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + o, (kk * dz + a * (x - hi) + cc).to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def eval_coef_kernel(
    mean_ptr,  # (C,) running mean (any float), or the float64 mean (GIVEN_INVSTD)
    var_ptr,  # (C,) running variance (any float), or the float64 invstd (GIVEN_INVSTD)
    w_ptr, b_ptr,  # affine parameters if HAS_W / HAS_B
    coef_ptr,  # (3, C) float32 out: hi, scale, shift
    C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, GIVEN_INVSTD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(tl.float64)
    if GIVEN_INVSTD:
        invstd = tl.load(var_ptr + c, mask=ok, other=1.0).to(tl.float64)
    else:
        invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=ok, other=1.0).to(tl.float64) + eps)
    hi = mean.to(tl.float32)
    lo = (mean - hi.to(tl.float64)).to(tl.float32).to(tl.float64)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=ok, other=1.0).to(tl.float64)
    shift = -lo * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float64)
    tl.store(coef_ptr + c, hi, mask=ok)
    tl.store(coef_ptr + C + c, scale.to(tl.float32), mask=ok)
    tl.store(coef_ptr + 2 * C + c, shift.to(tl.float32), mask=ok)
