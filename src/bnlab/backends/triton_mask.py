"""The fused layer's 1-bit ReLU mask in Triton: reading it back a byte at a time.

Imported only by the kernel modules (triton_grad, triton_elementwise), never by ``import bnlab``.

The mask has rows of K positions padded to K8B = ceil(K / 8) bytes: bit k % 8 of byte
row*K8B + k // 8 says whether position k of that row passed the ReLU (triton_elementwise's
normalize_kernel writes it). The backward kernels read it under tiles of [BLOCK_R rows,
BLOCK_K positions] whose first position is a multiple of BLOCK_K.

Why bytes and not bits: a load per position, at byte k // 8, takes a 64-bit address and a
predicate per value, and eight loads of the same byte; compiled for sm_90 that alone took the
channels-last gradient sums from 62-90 to 128-235 registers and made two variants spill (Triton
3.6). Loading the tile's [BLOCK_R, BLOCK_K // 8] bytes once, coalesced, and spreading each byte's
bits over its eight positions in registers costs one load per eight values.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu_masked(dz, mask_ptr, row_byte, row_ok, k0, K, K8B, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz where the mask's bit is set, 0 elsewhere: the gradient through the ReLU.

    dz: [BLOCK_R, BLOCK_K] float32 tile; row_byte: [BLOCK_R] int64 offsets row*K8B of the tile's
    mask rows; row_ok: [BLOCK_R] rows inside the tensor; k0: the tile's first position (a multiple
    of BLOCK_K); K: positions per row.
    """
    if BLOCK_K >= 8:
        j = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ok = row_ok[:, None] & (j < K8B)[None, :]
        packed = tl.load(mask_ptr + row_byte[:, None] + j[None, :], mask=ok, other=0).to(tl.int32)
        spread = tl.broadcast_to(packed[:, :, None], (BLOCK_R, BLOCK_K // 8, 8)) >> tl.arange(0, 8)[None, None, :]
        bits = tl.reshape(spread & 1, (BLOCK_R, BLOCK_K))
    else:
        # tiles narrower than a byte (rows of fewer than 8 positions): one load per position
        k = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (k < K)[None, :]
        packed = tl.load(mask_ptr + row_byte[:, None] + (k // 8)[None, :], mask=ok, other=0).to(tl.int32)
        bits = (packed >> (k % 8)[None, :]) & 1
    return tl.where(bits != 0, dz, 0.0)
