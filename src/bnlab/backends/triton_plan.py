"""How bnlab's Triton kernels see a dense input: plans, tiles and the host-side integer helpers.

Imported by bnlab.backends.triton_ops; needs torch only. A plan (:class:`Plan`) says how an
input is viewed (NCL rows of one channel's values, or NLC rows of the C channels), how the
reduce kernels split each channel into segments, and the tiles of the elementwise kernels.
Plans are remembered by shape, strides, tiles and program count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


# Host-side integer helpers. Not triton.cdiv / triton.next_power_of_2: called from Python those
# go through Triton's JIT-function wrapper, about 3 us each, and a training step made 16 such
# calls (host time is what a GPU step of a cache-sized tensor waits on).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


class Plan(NamedTuple):
    """How the kernels see a dense input: NCL rows (n*C + c) of L values, or NLC rows of C channels.

    Reduce grid: (C, segments) for NCL, (channel blocks, segments) for NLC; elementwise grid:
    tiles of [block_r, block_k] over R rows of K contiguous values.
    """

    ncl: bool
    n: int
    c: int
    length: int  # L; 1 for NLC
    block_a: int  # reduce tile: BLOCK_N (NCL) or BLOCK_M (NLC)
    block_b: int  # reduce tile: BLOCK_L (NCL) or BLOCK_C (NLC)
    segments: int
    per_segment: int  # NCL: tiles per segment; NLC: rows per segment
    block_r: int
    block_k: int
    warps_reduce: int = 4  # num_warps of the statistics and gradient-sum kernels
    warps_elementwise: int = 4  # num_warps of normalize and the input gradient
    unroll: int = 1  # statistics kernels: tiles loaded together per step
    grad_unroll: int = 1  # gradient-sum kernels: the same, at most GRAD_UNROLL_MAX

    @property
    def m(self) -> int:
        """Values per channel."""
        return self.n * self.length

    @property
    def rows(self) -> int:
        return self.n * self.c if self.ncl else self.n

    @property
    def k(self) -> int:
        return self.length if self.ncl else self.c

    @property
    def k8b(self) -> int:
        """Bytes per row of the ReLU mask."""
        return (self.k + 7) // 8


class Tiles(NamedTuple):
    """How large a GPU program's tiles are: values per tile and warps per program, for the reduce
    kernels (statistics, gradient sums) and the elementwise ones (normalize, input gradient).

    ``width`` bounds a tile's row: NCL tiles span min(L, width) positions of a row, elementwise
    tiles min(K, width) values. All are powers of two. ``unroll``: how many tiles the statistics and
    gradient-sum kernels load together per step (more bytes in flight per program), for 16-bit
    inputs and channels-last (NLC) ones; NCL inputs of 32 or 64 bits take one tile per step.
    Measured on an H200, 411 MB inputs, each kernel alone, GB/s at one / two / four tiles per
    step (benchmarks/results/h200_s23_round4_log.txt): float32 statistics NCHW 3325 / 2990 / 2625,
    channels-last 2949 / 2147 / 4061; bfloat16 statistics NCHW 2552 / 2658 / 3405, channels-last
    2639 / 3372 / 3506 (the gradient sums take at most two for 16-bit inputs and one for 32-bit
    ones: GRAD_UNROLL_MAX).
    """

    reduce_tile: int = 2048
    reduce_warps: int = 4
    elementwise_tile: int = 2048
    elementwise_warps: int = 4
    width: int = 1024
    unroll: int = 4


#: The gradient sums' tiles per step at most, for 16-bit inputs: they load two tensors per tile,
#: and four tiles of both held 255 registers and spilled 852 bytes (grad_nlc_kernel with the ReLU
#: mask, sm_90); measured on an H200 two gave what four did (bfloat16, 411 MB: 3772 and 3746 GB/s,
#: against 3884 and 3716). 32-bit inputs take one tile per step: channels-last float32 read
#: 4258-4301 GB/s at one, two or four (H200), and two spilled 40 bytes under Triton 3.6 (few
#: channels, with the mask).
GRAD_UNROLL_MAX = 2

#: The tiles of every GPU launch. benchmarks/triton_tune.py times alternatives on a GPU (each kernel
#: family alone; on an H200 none beat these tiles, and the unroll was chosen so), and
#: benchmarks/bench_bn.py --triton-tiles runs the benchmark under others without editing this line.
GPU_TILES = Tiles()
#: The interpreter's (CPU tests): small tiles, many of them, so that tails and merges are exercised;
#: 16-bit and channels-last inputs two tiles per step, so that a segment's last step often holds a
#: tile past its end.
_INTERPRETER_TILES = Tiles(128, 4, 128, 4, 64, 2)


def parse_tiles(text: str) -> Tiles:
    """Tiles from "reduce_tile,reduce_warps,elementwise_tile,elementwise_warps,width[,unroll]", e.g.
    "4096,8,2048,4,1024" or "2048,4,2048,4,1024,2" (unroll 4 when left out).

    Raises ValueError naming what was expected when a value is missing or not a power of two
    (unroll: any positive number).
    """
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    n_fields = len(Tiles._fields)
    counted = len(values) in (n_fields - 1, n_fields)
    if not counted or any(v < 1 or v & (v - 1) for v in values[:5]) or min(values) < 1:
        raise ValueError(f"tiles: expected {n_fields - 1} comma-separated powers of two "
                         f"({','.join(Tiles._fields[:-1])}) and optionally unroll (a positive number), got {text!r}")  # fmt: skip
    tiles = Tiles(*values)
    if min(tiles.reduce_tile, tiles.elementwise_tile) < 8 or tiles.width < 8:
        raise ValueError(f"tiles: tile sizes and width must be at least 8 (a mask byte per tile row), got {text!r}")
    return tiles


#: multiprocessors assumed when planning for a GPU without one (an H100's count); used by the
#: compile check, which compiles the kernels for a GPU target on a machine that has none
_ASSUMED_SM_COUNT = 132
_SM_COUNT: dict = {}  # device index -> its multiprocessors
#: Programs of the reduce kernels (channels x segments) wanted per multiprocessor: enough loads in
#: flight to keep the memory busy. benchmarks/triton_programs.py times other counts on a GPU, and
#: bench_bn.py --triton-programs runs the benchmark under one.
PROGRAMS_PER_SM = 4
#: Whether the reduce kernels take NCL rows in tiles fitted to their length (:func:`row_width`)
#: rather than the next power of two up to ``width``. Off: not yet timed on a GPU. A row of
#: 56 x 56 = 3136 values in tiles of 1024 leaves 23 % of the lanes idle (the statistics read
#: 2772 GB/s there on an H200, against 3174 at 112 x 112, 6 % idle); benchmarks/triton_programs.py
#: --row-fit times both. The elementwise tiles keep their rows: fitted (16 rows of 128 values
#: instead of 2 of 1024) they held up to 156 registers instead of 96 in the compile check.
ROW_FIT = False


def _programs_wanted(x: torch.Tensor, gpu: bool) -> int:
    if not gpu:
        return 4  # the interpreter: a few segments, so that the merge is exercised
    if not x.is_cuda:
        return PROGRAMS_PER_SM * _ASSUMED_SM_COUNT
    index = x.get_device()  # a CUDA tensor's device index (one call; x.device makes a device object)
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return PROGRAMS_PER_SM * _SM_COUNT[index]


def plan(x: torch.Tensor, for_gpu: bool | None = None, tiles: Tiles | None = None) -> Plan | None:
    """The plan for x, or None if x is empty or neither contiguous nor channels-last (channels innermost).

    ``for_gpu`` (default: x.is_cuda) picks GPU tiles (:data:`GPU_TILES`) rather than the
    interpreter's small ones; ``tiles`` overrides either.
    """
    if x.numel() == 0:
        return None
    gpu = x.is_cuda if for_gpu is None else for_gpu
    t = tiles or (GPU_TILES if gpu else _INTERPRETER_TILES)
    wanted = _programs_wanted(x, gpu)
    # A plan depends on nothing else (the element size and layout set the unroll); looked up, it costs a few
    # tenths of a microsecond of a GPU call's host time instead of two (benchmarks/triton_host_time.py).
    key = (x.shape, x.stride(), x.element_size(), t, wanted, ROW_FIT)
    found = _PLANS.get(key, _NO_PLAN)
    if found is _NO_PLAN:
        if len(_PLANS) >= _PLANS_KEPT:
            _PLANS.clear()
        found = _PLANS[key] = _new_plan(x, t, wanted)
    return found


def row_width(k: int, width: int) -> int:
    """The tile row for rows of k values under ROW_FIT: a power of two at most min(next power of
    two of k, width) and at least width / 16 (64 values at the GPU's width: 256 contiguous bytes
    of float32), the widest whose idle lanes (the last tile's padding) are not more than 1/16 of
    the row above the least of them: 3136 values (56 x 56) 256 (6 % idle instead of 23 %), 784
    (28 x 28) 64 (6 % instead of 23 %), 12544 (112 x 112) 1024 as before (6 %). (Within 1/32, 3136
    took 128, and the 16-bit gradient sums with a ReLU mask spilled 24-32 bytes in the compile check.)
    """
    top = min(_pow2(k), width)
    floor = min(top, max(8, width // 16))
    widths = [top >> i for i in range(top.bit_length()) if top >> i >= floor]  # widest first
    least = min(_idle(k, b) for b in widths)
    return next(b for b in widths if _idle(k, b) <= least + 1 / 16)


def _idle(k: int, b: int) -> float:
    """The fraction of a row's lanes that tiles of b values leave idle."""
    padded = _cdiv(k, b) * b
    return (padded - k) / padded


_PLANS: dict = {}
_PLANS_KEPT = 1024
_NO_PLAN = object()


def _new_plan(x: torch.Tensor, t: Tiles, wanted: int) -> Plan | None:
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // (n * c)
    if x.is_contiguous() and length > 1:
        ncl = True
    elif x.is_contiguous() or (x.stride(1) == 1 and x.movedim(1, -1).is_contiguous()):
        ncl, n, length = False, n * length, 1
    else:
        return None
    tile, width = t.reduce_tile, t.width
    if ncl:
        block_b = row_width(length, width) if ROW_FIT else min(_pow2(length), width)  # BLOCK_L
        block_a = max(1, tile // block_b)  # BLOCK_N
        n_tiles = _cdiv(n, block_a) * _cdiv(length, block_b)
        segments = max(1, min(n_tiles, wanted // c, 1024))
        per = _cdiv(n_tiles, segments)
        segments = _cdiv(n_tiles, per)
    else:
        block_b = min(64, _pow2(c))  # BLOCK_C
        block_a = max(16, tile // block_b)  # BLOCK_M
        segments = max(1, min(_cdiv(n, block_a), wanted // _cdiv(c, block_b), 1024))
        per = _cdiv(_cdiv(n, segments), block_a) * block_a
        segments = _cdiv(n, per)
    k = length if ncl else c
    block_k = max(8, min(_pow2(k), width))
    block_r = max(1, t.elementwise_tile // block_k)
    # one tile per step for NCL float32 statistics (see Tiles: 3325 GB/s against 2625 at four) and
    # for 32-bit gradient sums (GRAD_UNROLL_MAX)
    sixteen_bit = x.element_size() == 2
    unroll = t.unroll if (sixteen_bit or not ncl) else 1
    grad_unroll = min(t.unroll, GRAD_UNROLL_MAX) if sixteen_bit else 1
    return Plan(ncl, n, c, length, block_a, block_b, segments, per, block_r, block_k, t.reduce_warps,
                t.elementwise_warps, unroll, grad_unroll)  # fmt: skip
