"""The cases of benchmarks/fuzz_triton.py: each drawn at random from a seed and an index.

draw_case(seed, index) gives a JSON-able spec (kind, mode, dtype, shape, layout, values, the
layer's options, the upstream gradient and the Triton knobs: tiles, programs, SMALL_NUMEL,
MERGE_IN_TILES_MAX, the eval kernel choice), from which fuzz_triton.run_case rebuilds every tensor;
fuzz_triton.py's docstring says what is drawn and why.
"""

from __future__ import annotations

import math
import random

import torch

from bnlab.backends import triton_plan  # torch only: the plans' tiles
from fuzz_odd_vectors import ODD_VECTORS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
KINDS = ("bn1d", "bn2d", "bn3d", "act", "act_res")
MODES = ("train", "train_nograd", "eval_nograd", "eval_graph")
#: channel counts around the kernels' blocks: NLC BLOCK_C (<= 64), the one-program kernels'
#: pow2(C) and SMALL_MAX_C (1024), the running averages' 256-channel loop, eval_coef's 1024
_C_SMALL = (1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65)
_C_LARGE = (96, 100, 127, 128, 129, 200, 255, 256, 257, 300, 511, 512, 513, 700, 1023, 1024, 1025, 1100)
#: positions per row around NCL BLOCK_L (min(pow2(L), width)) and the mask's bytes
_L_SPECIAL = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 513, 1023,
              1024, 1025, 2047, 2049)  # fmt: skip
#: triton_tune.py's candidates, the GPU default first
_TUNE_TILES = ((2048, 4, 2048, 4, 1024), (1024, 4, 1024, 4, 1024), (2048, 8, 2048, 8, 1024), (4096, 8, 4096, 8, 1024),
               (4096, 16, 4096, 16, 1024), (8192, 16, 8192, 16, 2048))  # fmt: skip
_INTERP_TILES = tuple(triton_plan._INTERPRETER_TILES)
_GPU_UNROLL = triton_plan.Tiles().unroll


def _log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    lo, hi = max(1, lo), max(1, hi)
    if hi <= lo:
        return lo
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _split(rng: random.Random, total: int, dims: int) -> list[int]:
    """dims sizes whose product is about total (each >= 1)."""
    sizes = []
    left = total
    for i in range(dims - 1):
        s = max(1, round(left ** rng.uniform(0, 1 / (dims - i) * 2))) if left > 1 else 1
        s = min(s, left)
        sizes.append(s)
        left = max(1, left // s)
    sizes.append(left)
    rng.shuffle(sizes)
    return sizes


def _plan_unroll(tiles) -> int:
    """The unroll of these tiles as given, else the GPU default (Tiles' sixth field)."""
    return tiles[5] if len(tiles) > 5 else _GPU_UNROLL


def _draw_knobs(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.55:
        tiles = list(_INTERP_TILES)
    elif r < 0.65:
        tiles = [128, 4, 1024, 4, 64]  # tests/test_triton_paths.py's wide tiles
    elif r < 0.8:
        tiles = list(rng.choice(_TUNE_TILES))
    else:  # any tiles parse_tiles accepts: powers of two, tiles and width >= 8
        tiles = [2 ** rng.randint(3, 12), 2 ** rng.randint(0, 4), 2 ** rng.randint(3, 12), 2 ** rng.randint(0, 4),
                 2 ** rng.randint(3, 11)]  # fmt: skip
    tiles = list(tiles)[:5] + [rng.choice([1, 2, 3, 4, 8]) if rng.random() < 0.5 else _plan_unroll(tiles)]
    r = rng.random()
    wanted = 4 if r < 0.6 else 1 if r < 0.7 else rng.choice([2, 3, 8, 16, 64]) if r < 0.85 else 4 * 132
    r = rng.random()
    small = "default" if r < 0.65 else 0 if r < 0.85 else "edge"  # edge: the input's own n*c, or one less
    r = rng.random()
    merge = "default" if r < 0.8 else rng.choice([0, 1 << 20])
    r = rng.random()
    eval_one = "default" if r < 0.8 else rng.choice([True, False])
    return {"tiles": tiles, "wanted": wanted, "small_numel": small, "merge_max": merge, "eval_one": eval_one}


def draw_case(seed: int, index: int, max_numel: int = 24_000, kind: str | None = None, mode: str | None = None,
              dtype: str | None = None, **fixed) -> dict:  # fmt: skip
    """The spec of case ``index`` of campaign ``seed``: a JSON-able dict that rebuilds every tensor.

    kind, mode, dtype and ``fixed`` (any other key of the spec, e.g. layout or values) pin those
    fields instead of drawing them (the rest is drawn as it would be)."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = kind or rng.choices(KINDS, weights=(3, 4, 2, 2, 2))[0]
    mode = mode or rng.choices(MODES, weights=(6, 1, 2, 2))[0]
    if dtype is None:
        dtype = rng.choices(list(DTYPES), weights=(70, 12, 12, 6))[0]
    knobs = _draw_knobs(rng)
    # interpreter time grows with the programs launched: bigger inputs only with bigger tiles
    cap = max_numel if knobs["tiles"][2] >= 1024 and knobs["tiles"][0] >= 512 else max(64, max_numel // 3)
    rank = {"bn1d": rng.choice([2, 3]), "bn2d": 4, "bn3d": 5, "act": 4, "act_res": 4}[kind]
    r = rng.random()
    if r < 0.6:
        c = rng.choice(_C_SMALL)
    elif r < 0.8:
        c = rng.choice(_C_LARGE)
    else:
        c = rng.randint(1, 300)
    c = min(c, max(1, cap // 2))
    budget = _log_uniform_int(rng, max(8, 2 * c), max(8, cap))
    m_max = max(1, budget // c)
    if rank == 2:
        n, spatial = _log_uniform_int(rng, 1, m_max), []
    else:
        r = rng.random()
        if r < 0.1:  # rows of 1: every spatial size 1
            length = 1
        elif r < 0.4:
            fits = [v for v in _L_SPECIAL if v <= m_max]
            length = rng.choice(fits) if fits else 1
        else:
            length = _log_uniform_int(rng, 1, m_max)
        r = rng.random()
        n = 1 if r < 0.12 else rng.choice([2, 3]) if r < 0.25 else _log_uniform_int(rng, 1, max(1, m_max // length))
        spatial = _split(rng, length, rank - 2)
    training = mode.startswith("train")
    if training and n * math.prod(spatial) == 1 and rng.random() < 0.9:
        n = 2  # one value per channel in training is refused by both; rarely drawn
    layout_draw = rng.random()
    ncl = rank > 2 and math.prod(spatial) > 1 and layout_draw < 0.5
    if ncl and c > 128 and rng.random() < 0.85:
        # NCL inputs launch programs per channel: many channels are slow in the interpreter
        c = rng.choice([v for v in _C_SMALL + (96, 100, 127, 128) if v <= c])
    shape = [n, c] + spatial
    r = layout_draw
    layout = "nchw" if r < 0.5 else "cl" if r < 0.93 else rng.choice(["cf", "strided"])
    values = rng.choices(["randn", "large_mean", "wide", "constant", "nonfinite", "tiny", "huge"],
                         weights=(40, 12, 14, 10, 10, 8, 3))[0]  # fmt: skip
    if dtype in ("float16", "bfloat16") and values in ("large_mean", "huge"):
        values = "wide"
    affine = rng.random() < 0.8
    r = rng.random()
    momentum = 0.1 if r < 0.5 else None if r < 0.8 else rng.choice([0.0, 1.0, round(rng.uniform(0, 1), 6)])
    spec = {
        "kind": kind,
        "mode": mode,
        "dtype": dtype,
        "shape": shape,
        "layout": layout,
        "dy_layout": rng.choice(["same", "nchw", "cl"]),
        "res_layout": rng.choice(["same", "nchw", "cl"]),
        "values": values,
        "eps": float(f"{10 ** rng.uniform(-7, -1):.3g}"),
        "momentum": momentum,
        "affine": affine,
        "bias": (rng.random() < 0.85) if affine else True,
        "track": rng.random() < 0.8,
        "guard": rng.random() < 0.8,
        "nbt0": rng.choice([0, 0, 0, 1, 5]),
        "steps": rng.choice([1, 1, 2]) if mode == "train" else 1,
        "then_eval": mode == "train" and rng.random() < 0.3,
        "x_grad": True if mode != "eval_graph" else rng.random() < 0.85,
        "frozen_params": mode == "eval_graph" and rng.random() < 0.3,
        "zero_var": rng.random() < 0.1,
        "negative_var": mode.startswith("eval") and rng.random() < 0.03,
        "f64_params": dtype == "float64" and rng.random() < 0.5,
        "seed": rng.randrange(2**31),
        "knobs": knobs,
        # drawn last, so that the choices above are those of campaigns before it existed
        "dy_values": rng.choices(["randn", "nonfinite"], weights=(90, 10))[0],
        "vectors": rng.choices((None, *ODD_VECTORS), weights=(88, 4, 4, 4))[0],  # (fortieth session)
    }
    unknown = set(fixed) - set(spec)
    if unknown:
        raise ValueError(f"draw_case: unknown spec fields {sorted(unknown)}")
    spec.update(fixed)
    return spec
