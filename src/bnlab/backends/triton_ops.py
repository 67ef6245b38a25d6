"""Launchers of bnlab's Triton kernels: layouts, grids and buffers (imports triton; loaded lazily).

Forward (training): stats_partial (channel blocks x segments) -> stats_merge (per channel: float64
statistics, normalize coefficients, running averages) -> normalize (flat; + residual, ReLU and a
1-bit mask for the fused layer). Traffic 3N: x is read twice, y written once.
Backward: grad_partial -> grad_merge (sums, dx coefficients, dweight/dbias) -> grad_input (flat).
Traffic 5N: dy and x read twice, dx written once (plus the mask, N/8 bytes, when fused).

Works on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from bnlab.backends import triton_elementwise as ew
from bnlab.backends import triton_reduce as red

_F64, _F32 = torch.float64, torch.float32
_SM_COUNT: dict = {}


class Plan(NamedTuple):
    """How the kernels address a dense input x viewed as (N, C, L); see triton_reduce."""

    n: int
    c: int
    length: int
    s_n: int
    s_c: int
    s_l: int
    rows_flat: bool  # L == 1: the reduction index is the row, no division
    cdiv: int  # elementwise kernels: channel of offset o is (o // cdiv) % C
    block_m: int
    block_c: int
    segments: int
    seg: int

    @property
    def m(self) -> int:
        return self.n * self.length


def _programs_wanted(x: torch.Tensor) -> int:
    if not x.is_cuda:
        return 4  # the interpreter: a few segments, so that the merge is exercised
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def plan(x: torch.Tensor) -> Plan | None:
    """The plan for x, or None if x is empty or neither contiguous nor channels-last (channels innermost)."""
    if x.numel() == 0:
        return None
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // (n * c)
    if x.is_contiguous() and length > 1:
        layout = (n, c, length, c * length, length, 1, False, length)
    elif x.is_contiguous() or (x.stride(1) == 1 and x.movedim(1, -1).is_contiguous()):
        layout = (n * length, c, 1, c, 1, 0, True, 1)  # rows of C contiguous channels
    else:
        return None
    rows = layout[0] * layout[2]
    if layout[4] == 1:  # channels innermost: tiles of rows x channels, coalesced along channels
        block_c = min(64, triton.next_power_of_2(c))
        block_m = max(16, 2048 // block_c) if x.is_cuda else 16
    else:  # contiguous rows of one channel
        block_c, block_m = 1, (1024 if x.is_cuda else 64)
    c_blocks = triton.cdiv(c, block_c)
    segments = max(1, min(triton.cdiv(rows, block_m), _programs_wanted(x) // c_blocks, 1024))
    seg = triton.cdiv(triton.cdiv(rows, segments), block_m) * block_m
    return Plan(*layout, block_m, block_c, triton.cdiv(rows, seg), seg)


def _block(x: torch.Tensor) -> int:
    return 1024 if x.is_cuda else 256


def forward_train(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.0, counter=None,
                  residual=None, relu=False, want_mask=False, want_y=True, p: Plan | None = None):  # fmt: skip
    """(y, stats (3, C) float64 [mean, M2, invstd], coef (3, C) float32 [hi, scale, shift], mask or None).

    Updates running_mean/running_var (both or neither) with ``momentum``; with ``counter`` (a
    module's num_batches_tracked), counts the batch first, and momentum None means 1/counter.
    ``want_y=False``: statistics only (y and mask None).
    """
    p = p or plan(x)
    c = p.c
    part = torch.empty(p.segments, c, 3, dtype=_F64, device=x.device)
    red.stats_partial_kernel[(triton.cdiv(c, p.block_c), p.segments)](
        x, part, c, p.length, p.m, p.seg, p.s_n, p.s_c, p.s_l,
        BLOCK_M=p.block_m, BLOCK_C=p.block_c, ROWS_FLAT=p.rows_flat,
    )  # fmt: skip
    if counter is not None:
        counter.add_(1)
    stats = torch.empty(3, c, dtype=_F64, device=x.device)
    coef = torch.empty(3, c, dtype=_F32, device=x.device)
    update = running_mean is not None
    red.stats_merge_kernel[(c,)](
        part, x, stats, coef,
        weight if weight is not None else x, bias if bias is not None else x,
        running_mean if update else x, running_var if update else x, counter if counter is not None else x,
        c, p.segments, p.s_c, eps, 0.0 if momentum is None else float(momentum),
        HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update, CUMULATIVE=momentum is None,
        BLOCK_S=triton.next_power_of_2(p.segments),
    )  # fmt: skip
    if not want_y:
        return None, stats, coef, None
    y, mask = _normalize(x, coef, p, residual, relu, want_mask)
    return y, stats, coef, mask


def _normalize(x, coef, p: Plan, residual=None, relu=False, want_mask=False):
    numel = x.numel()
    y = torch.empty_like(x)
    mask = torch.empty((numel + 7) // 8, dtype=torch.uint8, device=x.device) if want_mask else None
    block = _block(x)
    ew.normalize_kernel[(triton.cdiv(numel, block),)](
        x, y, coef, residual if residual is not None else x, mask if mask is not None else y,
        numel, p.c, p.cdiv,
        HAS_RES=residual is not None, RELU=relu, WRITE_MASK=want_mask, BLOCK=block,
    )  # fmt: skip
    return y, mask


def backward(dy, x, stats, hi, weight, need_dx=True, mask=None, want_dres=False, dweight=None, dbias=None,
             p: Plan | None = None):  # fmt: skip
    """(dx or None, sums (2, C) float64 [Σdz, Σdz·x̂], dres or None), dz = dy masked by the ReLU mask.

    stats: (3, C) float64 rows mean, (unused), invstd; hi: (C,) float32, the mean rounded to float32.
    dweight/dbias, if given, receive Σdz·x̂ and Σdz in their dtypes.
    """
    p = p or plan(x)
    c = p.c
    part = torch.empty(p.segments, c, 2, dtype=_F64, device=x.device)
    red.grad_partial_kernel[(triton.cdiv(c, p.block_c), p.segments)](
        dy, x, mask if mask is not None else dy, hi, part, c, p.length, p.m, p.seg, p.s_n, p.s_c, p.s_l,
        BLOCK_M=p.block_m, BLOCK_C=p.block_c, ROWS_FLAT=p.rows_flat, HAS_MASK=mask is not None,
    )  # fmt: skip
    sums = torch.empty(2, c, dtype=_F64, device=x.device)
    gcoef = torch.empty(4, c, dtype=_F32, device=x.device)
    red.grad_merge_kernel[(c,)](
        part, stats, weight if weight is not None else x, sums, gcoef,
        dweight if dweight is not None else sums, dbias if dbias is not None else sums,
        c, p.segments, float(p.m),
        HAS_W=weight is not None, WRITE_DW=dweight is not None, WRITE_DB=dbias is not None,
        BLOCK_S=triton.next_power_of_2(p.segments),
    )  # fmt: skip
    dx, dres = _grad_input(dy, x, gcoef, p, mask, need_dx, want_dres)
    return dx, sums, dres


def _grad_input(dy, x, gcoef, p: Plan, mask=None, need_dx=True, want_dres=False):
    dx = torch.empty_like(x) if need_dx else None
    dres = torch.empty_like(x) if want_dres else None
    if dx is None and dres is None:
        return None, None
    numel, block = x.numel(), _block(x)
    ew.grad_input_kernel[(triton.cdiv(numel, block),)](
        dy, x, mask if mask is not None else dy, gcoef,
        dx if dx is not None else dy, dres if dres is not None else dy, numel, p.c, p.cdiv,
        HAS_MASK=mask is not None, HAS_DX=dx is not None, WRITE_DRES=dres is not None, BLOCK=block,
    )  # fmt: skip
    return dx, dres


def normalize_with(x, mean, var_or_invstd, weight, bias, eps=0.0, given_invstd=True, residual=None, relu=False,
                   p: Plan | None = None):  # fmt: skip
    """y = BN(x) with fixed statistics: float64 mean and invstd, or running mean and variance (+ eps)."""
    p = p or plan(x)
    coef = torch.empty(3, p.c, dtype=_F32, device=x.device)
    ew.eval_coef_kernel[(triton.cdiv(p.c, 256),)](
        mean, var_or_invstd, weight if weight is not None else mean, bias if bias is not None else mean, coef,
        p.c, eps, HAS_W=weight is not None, HAS_B=bias is not None, GIVEN_INVSTD=given_invstd, BLOCK=256,
    )  # fmt: skip
    return _normalize(x, coef, p, residual, relu)[0]


def grad_input_with(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, p: Plan | None = None):
    """dx from given float64 sums (the primitive SyncBatchNorm uses); coefficients as elementwise.grad_input."""
    p = p or plan(x)
    hi = mean.to(_F32)
    lo = (mean - hi.to(_F64)).to(_F32).to(_F64)
    kk = invstd * (weight.to(_F64) if weight is not None else 1.0)
    a = -kk * invstd * sum_dy_xhat / count
    cc = -kk * sum_dy / count - a * lo
    gcoef = torch.stack([hi, kk.to(_F32), a.to(_F32), cc.to(_F32)])
    return _grad_input(dy, x, gcoef, p)[0]
