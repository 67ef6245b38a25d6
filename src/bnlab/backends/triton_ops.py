"""Launchers of bnlab's Triton kernels: grids, buffers, and which kernels run (imports triton;
loaded lazily). How an input is seen (layouts, segments, tiles) is triton_plan's.

Forward (training): stats_ncl/stats_nlc (channels x segments) -> stats_merge (per channel: float64
statistics, normalize coefficients) -> normalize (tiles; + residual, ReLU and a 1-bit mask for
the fused layer), whose first program also updates the running averages (update_running: one
program, as the guard needs every channel). Three launches; traffic 3N: x is read twice, y
written once.
Backward: grad_ncl/grad_nlc -> grad_merge (sums, dx coefficients, dweight/dbias) -> grad_input;
for NCL tiles of few rows (merge_in_tiles) and no residual, grad_ncl -> grad_input_merged, whose
tiles merge their rows' sums themselves: two launches.
Traffic 5N: dy and x read twice, dx written once (plus the mask, N/8 bytes, when fused).
Eval: eval_kernel, one launch whose tiles compute their own coefficients, when tiles span few
channels (eval_one_launch); otherwise eval_coef (one program, also the negative-variance flag)
-> normalize.
Small rows of channels (one_program): one program each for the forward, the backward and eval
(triton_small), the same traffic in one launch.

Works on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import torch

from bnlab.backends import triton_elementwise as ew
from bnlab.backends import triton_grad as grad
from bnlab.backends import triton_launch as _launch
from bnlab.backends import triton_reduce as red
from bnlab.backends import triton_small as small
from bnlab.backends.triton_plan import Plan, Tiles, _cdiv, _pow2, parse_tiles, plan  # noqa: F401  (re-exported)
from bnlab.elementwise import finite_or_zero
from bnlab.stats import split_mean

_F64, _F32 = torch.float64, torch.float32


# Compile options of every launch. Multiplies and adds fused into FMAs (one rounding instead of
# two), as Triton has done by default so far and as the CPU kernels do: Triton 3.9 warns that its
# default turns to unfused in 3.10, which would move every result by rounding when Triton is
# upgraded; pinned, the kernels compute the same bits under either version.
_COMPILE = {"enable_fp_fusion": True}


def _partial_stats(x, p: Plan):
    part = torch.empty(p.segments, p.c, 3, dtype=_F64, device=x.device)
    if p.ncl:
        _launch.launch(red.stats_ncl_kernel, (p.c, p.segments),
            x, part, p.n, p.c, p.length, _cdiv(p.length, p.block_b), p.per_segment,
            BLOCK_N=p.block_a, BLOCK_L=p.block_b, UNROLL=p.unroll, num_warps=p.warps_reduce, **_COMPILE,
        )  # fmt: skip
    else:
        _launch.launch(red.stats_nlc_kernel, (_cdiv(p.c, p.block_b), p.segments),
            x, part, p.n, p.c, p.per_segment, BLOCK_M=p.block_a, BLOCK_C=p.block_b, UNROLL=p.unroll,
            num_warps=p.warps_reduce, **_COMPILE,
        )  # fmt: skip
    return part


def _partial_grads(dy, x, mask, hi, stats, p: Plan, centred: bool):
    part = torch.empty(p.segments, p.c, 2, dtype=_F64, device=x.device)
    mask_arg = mask if mask is not None else dy
    if p.ncl:
        _launch.launch(grad.grad_ncl_kernel, (p.c, p.segments),
            dy, x, mask_arg, hi, stats, part, p.n, p.c, p.length, _cdiv(p.length, p.block_b), p.per_segment, p.k8b,
            p.c * p.length, p.n * p.length,
            BLOCK_N=p.block_a, BLOCK_L=p.block_b, HAS_MASK=mask is not None, UNROLL=p.grad_unroll, CENTRED=centred,
            num_warps=p.warps_reduce, **_COMPILE,
        )  # fmt: skip
    else:
        _launch.launch(grad.grad_nlc_kernel, (_cdiv(p.c, p.block_b), p.segments),
            dy, x, mask_arg, hi, stats, part, p.n, p.c, p.per_segment, p.k8b,
            BLOCK_M=p.block_a, BLOCK_C=p.block_b, HAS_MASK=mask is not None, UNROLL=p.grad_unroll, CENTRED=centred,
            num_warps=p.warps_reduce, **_COMPILE,
        )  # fmt: skip
    return part


def _tiles(p: Plan):
    return (_cdiv(p.rows, p.block_r), _cdiv(p.k, p.block_k))


def forward_train(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.0, counter=None,
                  guard=False, residual=None, relu=False, want_mask=False, want_y=True,
                  p: Plan | None = None):  # fmt: skip
    """(y, stats (3, C) float64 [mean, M2, invstd], coef (3, C) float32 [hi, scale, shift], mask or None).

    Updates running_mean/running_var (both or neither) with ``momentum``; with ``counter`` (a
    module's num_batches_tracked) counts the batch, and momentum None means 1/counter; with
    ``guard``, a batch with non-finite statistics changes neither (all decided on the device).
    ``want_y=False``: statistics only (y and mask None), with neither running averages nor counter
    (the normalize kernel's first program updates them).
    """
    if not want_y and (running_mean is not None or counter is not None):
        raise ValueError("forward_train: want_y=False computes statistics only; expected running_mean and counter "
                         f"None, got {type(running_mean).__name__} and {type(counter).__name__}")  # fmt: skip
    p = p or plan(x)
    c = p.c
    if residual is None and not relu and not want_mask and one_program(p):
        return _small_forward(x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, want_y, p)
    part = _partial_stats(x, p)
    stats = torch.empty(3, c, dtype=_F64, device=x.device)
    coef = torch.empty(3, c, dtype=_F32, device=x.device)
    _launch.launch(red.stats_merge_kernel, (c,),
        part, x, stats, coef, weight if weight is not None else x, bias if bias is not None else x,
        c, p.segments, p.length if p.ncl else 1, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_S=_pow2(p.segments), **_COMPILE,
    )  # fmt: skip
    if not want_y:
        return None, stats, coef, None
    # the running averages, which the normalize kernel's first program updates (update_running);
    # stats stands in for the buffers that are absent. Without any, the plain launch: coef standing
    # in for all four keeps one compiled variant per configuration instead of two.
    update, count = running_mean is not None, counter is not None
    if not (update or count):
        y, mask = _normalize(x, coef, p, residual, relu, want_mask)
        return y, stats, coef, mask
    running = (stats, running_mean if update else stats, running_var if update else stats, counter if count else stats,
               float(p.m), 0.0 if momentum is None else float(momentum))  # fmt: skip
    flags = dict(RUNNING=True, UPDATE=update, COUNT=count, CUMULATIVE=momentum is None, GUARD=bool(guard))
    y, mask = _normalize(x, coef, p, residual, relu, want_mask, running, flags)
    return y, stats, coef, mask


#: Inputs of rows of channels (NLC) with at most this many values and SMALL_MAX_C channels run as
#: one program forward, one backward and one in eval (triton_small): one launch each instead of
#: three, three and one or two.
#: At 64 Ki float32 values one multiprocessor reads x in about a microsecond; far more and the
#: single program, not the host, would set the time.
SMALL_NUMEL = 1 << 16
SMALL_MAX_C = 1024
#: values per tile of the one-program kernels (16 per thread at 4 warps, as GPU_TILES' default)
_SMALL_TILE = 2048


def one_program(p: Plan) -> bool:
    """Whether the plan's input takes the one-program kernels (triton_small)."""
    return not p.ncl and p.c <= SMALL_MAX_C and p.n * p.c <= SMALL_NUMEL


def _small_blocks(p: Plan) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of the one-program kernels: every channel in one tile row."""
    block_c = _pow2(p.c)
    return max(1, min(_pow2(p.n), _SMALL_TILE // block_c)), block_c


def _small_forward(x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, want_y, p: Plan):
    stats = torch.empty(3, p.c, dtype=_F64, device=x.device)
    coef = torch.empty(3, p.c, dtype=_F32, device=x.device)
    y = torch.empty_like(x) if want_y else None
    update = running_mean is not None
    block_m, block_c = _small_blocks(p)
    _launch.launch(small.small_forward_kernel, (1,),
        x, y if y is not None else x, stats, coef, weight if weight is not None else x,
        bias if bias is not None else x, running_mean if update else stats, running_var if update else stats,
        counter if counter is not None else stats, p.n, p.c, float(p.n), eps,
        0.0 if momentum is None else float(momentum),
        HAS_W=weight is not None, HAS_B=bias is not None, UPDATE=update, COUNT=counter is not None,
        CUMULATIVE=momentum is None, GUARD=bool(guard), WANT_Y=want_y, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=p.warps_elementwise, **_COMPILE,
    )  # fmt: skip
    return y, stats, coef, None


def _small_backward(dy, x, stats, weight, need_dx, dweight, dbias, p: Plan, centred: bool):
    dx = torch.empty_like(x) if need_dx else None
    sums = torch.empty(2, p.c, dtype=_F64, device=x.device)
    block_m, block_c = _small_blocks(p)
    _launch.launch(small.small_backward_kernel, (1,),
        dy, x, stats, weight if weight is not None else x, dx if dx is not None else x, sums,
        dweight if dweight is not None else sums, dbias if dbias is not None else sums, p.n, p.c, float(p.n),
        HAS_W=weight is not None, HAS_DX=need_dx, WRITE_DW=dweight is not None, WRITE_DB=dbias is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, CENTRED=centred, num_warps=p.warps_elementwise, **_COMPILE,
    )  # fmt: skip
    return dx, sums, None


#: Channels per block of the running averages' loop when the normalize kernel's first program runs
#: it: fixed, so that the layer's width adds no compiled variants of the normalize kernel.
_RUN_BLOCK = 256
_NOT_RUNNING = dict(RUNNING=False, UPDATE=False, COUNT=False, CUMULATIVE=False, GUARD=False)


def _normalize(x, coef, p: Plan, residual=None, relu=False, want_mask=False, running=None, flags=_NOT_RUNNING):
    """y (and the ReLU mask); ``running``: (stats, running_mean, running_var, counter, count,
    momentum) for the first program's update of the running averages, under ``flags``."""
    y = torch.empty_like(x)
    mask = torch.empty(p.rows * p.k8b, dtype=torch.uint8, device=x.device) if want_mask else None
    stats, rm, rv, nbt, count, momentum = running or (coef, coef, coef, coef, 0.0, 0.0)
    _launch.launch(ew.normalize_kernel, _tiles(p),
        x, y, coef, residual if residual is not None else x, mask if mask is not None else y,
        stats, rm, rv, nbt, p.rows, p.k, p.c, p.k8b, count, momentum,
        NCL=p.ncl, HAS_RES=residual is not None, RELU=relu, WRITE_MASK=want_mask, **flags,
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, BLOCK_RUN=_RUN_BLOCK, num_warps=p.warps_elementwise, **_COMPILE,
    )  # fmt: skip
    return y, mask


def backward(dy, x, stats, hi, weight, need_dx=True, mask=None, want_dres=False, dweight=None, dbias=None,
             p: Plan | None = None, centred: bool = False):  # fmt: skip
    """(dx or None, sums (2, C) float64 [Σdz, Σdz·x̂], dres or None), dz = dy masked by the ReLU mask.

    stats: (3, C) float64 rows mean, (unused), invstd; hi: (C,) float32, the mean rounded to float32.
    dweight/dbias, if given, receive Σdz·x̂ and Σdz in their dtypes. centred: the mean is x's own
    batch mean (the training backward), and Σdz·x̂ is summed with dy's shift taken off first
    (triton_grad's CENTRED); False for any other mean (SyncBatchNorm's global one).
    """
    p = p or plan(x)
    c = p.c
    if mask is None and not want_dres and one_program(p):
        return _small_backward(dy, x, stats, weight, need_dx, dweight, dbias, p, centred)
    part = _partial_grads(dy, x, mask, hi, stats, p, centred)
    sums = torch.empty(2, c, dtype=_F64, device=x.device)
    # The residual's gradient (the fused add + ReLU layer) takes the merge kernel apart: written by
    # the merged tiles too, it made their sm_90 build spill 16 bytes (grad_input_merged_kernel).
    if need_dx and not want_dres and merge_in_tiles(p):
        return _grad_input_merged(dy, x, part, stats, weight, sums, p, mask, dweight, dbias, centred), sums, None
    gcoef = torch.empty(5, c, dtype=_F32, device=x.device)
    _launch.launch(grad.grad_merge_kernel, (c,),
        part, stats, weight if weight is not None else x, sums, gcoef,
        dweight if dweight is not None else sums, dbias if dbias is not None else sums, dy, c, p.segments, float(p.m),
        *((p.length, c * p.length, p.m) if p.ncl else (1, c, p.m)), **_merge_flags(weight, dweight, dbias, p),
        CENTRED=centred, **_COMPILE,
    )  # fmt: skip
    dx, dres = _grad_input(dy, x, gcoef, p, mask, need_dx, want_dres)
    return dx, sums, dres


def _merge_flags(weight, dweight, dbias, p: Plan) -> dict:
    return dict(HAS_W=weight is not None, WRITE_DW=dweight is not None, WRITE_DB=dbias is not None,
                BLOCK_S=_pow2(p.segments))  # fmt: skip


def _grad_input_merged(dy, x, part, stats, weight, sums, p: Plan, mask=None, dweight=None, dbias=None,
                       centred=False):  # fmt: skip
    """dx by grad_input_merged_kernel, which also writes sums (and dweight/dbias) from the
    (segments, C, 2) partial sums; NCL plans only (merge_in_tiles)."""
    dx = torch.empty_like(x)
    _launch.launch(ew.grad_input_merged_kernel, _tiles(p),
        dy, x, mask if mask is not None else dy, dx,
        part, stats, weight if weight is not None else x, sums, dweight if dweight is not None else sums,
        dbias if dbias is not None else sums, p.rows, p.k, p.c, p.k8b, p.segments, float(p.m),
        p.c * p.k, p.rows // p.c * p.k,
        HAS_MASK=mask is not None, CENTRED=centred, **_merge_flags(weight, dweight, dbias, p),
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=p.warps_elementwise, **_COMPILE,
    )  # fmt: skip
    return dx


#: Most float64 partial pairs a tile of grad_input_merged_kernel merges (rows per tile x segments,
#: rounded up to a power of two): 2 KB of L2 reads against a 2048-value tile's 24 KB and more.
MERGE_IN_TILES_MAX = 128


def merge_in_tiles(p: Plan) -> bool:
    """Whether the backward merges the partial sums in the input gradient's tiles (one launch
    fewer): NCL, with few rows per tile and few segments per channel, which every NCHW conv shape
    of the benchmark has under the default tiles (2-8 rows, 2-33 segments)."""
    return p.ncl and p.block_r * _pow2(p.segments) <= MERGE_IN_TILES_MAX


def _grad_input(dy, x, gcoef, p: Plan, mask=None, need_dx=True, want_dres=False):
    dx = torch.empty_like(x) if need_dx else None
    dres = torch.empty_like(x) if want_dres else None
    if dx is None and dres is None:
        return None, None
    _launch.launch(ew.grad_input_kernel, _tiles(p),
        dy, x, mask if mask is not None else dy, gcoef,
        dx if dx is not None else dy, dres if dres is not None else dy, p.rows, p.k, p.c, p.k8b,
        NCL=p.ncl, HAS_MASK=mask is not None, HAS_DX=dx is not None, WRITE_DRES=dres is not None,
        BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=p.warps_elementwise, **_COMPILE,
    )  # fmt: skip
    return dx, dres


def normalize_with(x, mean, var_or_invstd, weight, bias, eps=0.0, given_invstd=True, residual=None, relu=False,
                   p: Plan | None = None):  # fmt: skip
    """y = BN(x) with fixed statistics: float64 mean and invstd, or running mean and variance (+ eps).

    Returns y, or with running statistics (given_invstd=False) (y, ok): ok the uint8 flag of
    :func:`variance_flag`, 0 if some variance is negative (the caller raises or asserts at once; y
    is NaN there).
    """
    p = p or plan(x)
    ok = None if given_invstd else variance_flag(x)
    if residual is None and not relu and one_program(p):
        y = torch.empty_like(x)
        block_m, block_c = _small_blocks(p)
        _launch.launch(small.small_eval_kernel, (1,),
            x, y, mean, var_or_invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            ok if ok is not None else y, p.n, p.c, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, GIVEN_INVSTD=given_invstd, BLOCK_M=block_m,
            BLOCK_C=block_c, num_warps=p.warps_elementwise, **_COMPILE,
        )  # fmt: skip
        return y if given_invstd else (y, ok)
    w, b = weight if weight is not None else mean, bias if bias is not None else mean
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, GIVEN_INVSTD=given_invstd)
    if eval_one_launch(p):
        y = torch.empty_like(x)
        _launch.launch(ew.eval_kernel, _tiles(p),
            x, y, mean, var_or_invstd, w, b, ok if ok is not None else y, residual if residual is not None else x,
            p.rows, p.k, p.c, eps, NCL=p.ncl, **flags, HAS_RES=residual is not None, RELU=relu,
            BLOCK_R=p.block_r, BLOCK_K=p.block_k, BLOCK_C=_RUN_BLOCK, num_warps=p.warps_elementwise, **_COMPILE,
        )  # fmt: skip
        return y if given_invstd else (y, ok)
    coef = torch.empty(3, p.c, dtype=_F32, device=x.device)
    _launch.launch(ew.eval_coef_kernel, (1,),
        mean, var_or_invstd, w, b, coef, ok if ok is not None else coef, p.c, eps, **flags,
        BLOCK=min(1024, _pow2(p.c)), **_COMPILE,
    )  # fmt: skip
    y = _normalize(x, coef, p, residual, relu)[0]
    return y if given_invstd else (y, ok)


#: triton_launch.stream_of(x) -> the negative-variance flag of eval calls on that stream (variance_flag).
_FLAGS: dict = {}
_FLAGS_KEPT = 256


def variance_flag(x: torch.Tensor) -> torch.Tensor:
    """The uint8 flag of one element that eval's kernels clear when a running variance is negative
    (triton_elementwise.flag_negative), set to 1.

    On a GPU, one flag per stream, made once and kept: every eval call on the stream launches its
    kernel and then the asynchronous check of the flag (triton_backend._checked), in stream
    order, and a kernel only ever clears it. So a check sees every earlier clear on its stream,
    even when host threads interleave their calls, and a call allocates nothing for it (a
    torch.empty per call cost about 1.5 us of host time on the project's VM, the largest single
    part of a stubbed eval call after the launch; benchmarks/triton_host_time.py). Once cleared it
    stays so; the failed check has then already stopped the device's work (a device-side
    assertion ends the CUDA context). Not kept while the stream is being captured into a CUDA
    graph: memory allocated then belongs to the graph.

    Elsewhere (the interpreter, where the check reads the flag at once): a new flag each call.
    """
    key = _launch.stream_of(x)
    if key is None:
        return torch.ones((), dtype=torch.uint8, device=x.device)
    flag = _FLAGS.get(key)
    if flag is None:
        flag = torch.ones((), dtype=torch.uint8, device=x.device)
        if not _launch.capturing():
            if len(_FLAGS) >= _FLAGS_KEPT:
                _FLAGS.clear()
            _FLAGS[key] = flag
    return flag


def eval_one_launch(p: Plan) -> bool:
    """Whether eval runs as one kernel (eval_kernel) that computes the coefficients in every tile:
    when a tile spans few channels, at most one per 64 values (NCL rows of 33 values or more, NLC
    rows of 32 channels or fewer under the default tiles). Otherwise eval_coef_kernel computes
    them once and normalize_kernel applies them: two launches, but no float64 square roots per
    handful of values."""
    channels_per_tile = p.block_r if p.ncl else p.block_k
    return 64 * channels_per_tile <= p.block_r * p.block_k


def grad_input_with(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, p: Plan | None = None):
    """dx from given float64 sums (the primitive SyncBatchNorm uses); coefficients as elementwise.grad_input."""
    p = p or plan(x)
    hi, lo32 = split_mean(mean, _F32)
    lo = lo32.to(_F64)
    kk = invstd * (weight.to(_F64) if weight is not None else 1.0)
    a = -kk * invstd * sum_dy_xhat / count
    mean_dz = sum_dy / count
    gh = mean_dz.to(_F32)
    # the remainders, dropped where not finite (an infinite Σdy or Σdy·x̂: bnlab.elementwise.finite_or_zero)
    cc = -kk * finite_or_zero(mean_dz - gh.to(_F64)) - finite_or_zero(a * lo)
    a32 = a.to(_F32)
    # -lo for cc where a is infinite (triton_reduce.rounded_mean_constant)
    cc32 = torch.where(a32.isinf(), -lo32, cc.to(_F32))
    gcoef = torch.stack([hi, kk.to(_F32), a32, cc32, gh])
    return _grad_input(dy, x, gcoef, p)[0]
