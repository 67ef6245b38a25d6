"""Differential fuzzing of bnlab's CPU layers against torch.nn and the float64 reference.

Claim checked: for any input, bnlab.BatchNorm1d/2d/3d on the CPU backend (the compiled kernels,
every walk the BNLAB_* bounds can force) give what torch.nn.BatchNorm*d and bnlab.reference give,
within the project's tolerances (bnlab.reference.TOLERANCE: float32 2e-4, float64 1e-9, bf16
2e-2, float16 4e-3, relative to max(1, max |expected|); the parameter gradients, sums of m values,
relative to max(1, max |expected|, sqrt(m)); running statistics 1e-5 in float32 buffers). Each
random case (seeded) draws a layer (1d on (N, C) and (N, C, L), 2d, 3d), its options (affine,
bias, track_running_stats, momentum 0.1 / random / None, eps in [1e-5, 1e-1], skip_nonfinite), a
dtype (float32; float64; bf16 and float16 inputs with float32 parameters), a memory layout
(contiguous, channels-last of any rank, channels outermost, a permuted dense layout, a slice, an
expanded view, an unaligned storage offset; sometimes input or gradient a view with torch's negative
bit, torch._neg_view, whose memory holds -t; sometimes the parameters and running statistics
step-sliced, negative-bit or unaligned views: odd_vectors), a shape (1 value to a few MB, rows of over 2048
values, 1 to 1100 channels), 1-3 threads, the data (normal, 1e3 ± 0.01, constant channels,
NaN/inf), the upstream gradient (normal, or with NaN/inf, as an overflowing loss makes), and 1-3
steps (training forward+backward, training under no_grad, eval under no_grad, eval with a graph:
frozen BN), sometimes on the Python path (``python_path_only``). A failure is:
a result outside tolerance of the float64 reference; a result outside tolerance of torch.nn where
torch.nn itself is within half the tolerance of the reference (elsewhere, e.g. at 1e3 ± 0.01,
bnlab is documented as more precise and the reference alone judges); NaN/inf in other places than
torch.nn's, unless bnlab's places are the reference's (then torch.nn is off the reference: a note,
"torch.nn off the reference: ...", e.g. its float16 input gradient overflowing to inf where the
exact one is finite); running statistics or num_batches_tracked unlike the reference's update (or, for a
non-finite batch with the guard on, unlike no update); an exception torch.nn does not raise (or
none where it does); a crash or hang; an input changed; an earlier output changed by a later
call (the memory pool); a channels-last input without channels-last output.

Known failures: none. Until the thirtieth session about 1 case in 2,000 failed (docs/math.md §4.2
"Infinite sums"): an infinite dy in a channel of float32 data at 1e3 ± 0.01 whose x equals the
mean rounded to float32 at some positions, where x - mean_hi = 0 made dx 0·inf = NaN and the exact
x - mean = -mean_lo the reference's ±inf; the kernels now recompute dx there
(dx_at_rounded_means).

Each bound setting (SETTINGS) runs in its own process, as the C statics read the bounds once;
the setting "portable" turns the compiled kernels off (BNLAB_CPU_KERNELS=0), so that the same
cases check the portable backend, the fallback without a compiler:

    PYTHONPATH=src python benchmarks/fuzz_kernels.py --seconds 600 [--seed 0] [--settings default,ncl-flat]
    PYTHONPATH=src python benchmarks/fuzz_kernels.py --replay benchmarks/results/fuzz_kernels_failures.jsonl

Failing cases are appended to --out as JSON lines {"setting", "env", "case", "failures"}: --replay
runs them again, each under its setting (the case holds every draw, the data comes from its seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from bench_cases import positive_float, positive_int
from fuzz_odd_vectors import ODD_VECTORS, odd_vectors

SETTINGS = {
    "default": {},
    "stream0": {"BNLAB_STREAM_MIN_BYTES": "0"},
    "ncl-channels": {"BNLAB_NCL_FLAT_MAX_BYTES": "0", "BNLAB_NCL_GROUP_BYTES": "0"},
    "ncl-flat": {"BNLAB_NCL_FLAT_MAX_BYTES": str(1 << 40), "BNLAB_NCL_GROUP_BYTES": "0"},
    "ncl-groups": {"BNLAB_NCL_FLAT_MAX_BYTES": "0", "BNLAB_NCL_GROUP_BYTES": str(1 << 20)},
    "nlc-rows": {"BNLAB_NLC_GROUP_MAX_BYTES": "0"},
    "nlc-groups": {"BNLAB_NLC_GROUP_MAX_BYTES": str(1 << 40)},
    # inputs of at most 16 rows on one thread through the general NLC walks, not the narrow ones
    "nlc-general": {"BNLAB_NLC_NARROW_MAX_BYTES": "0"},
    "last-first": {"BNLAB_LAST_FIRST_MIN_BYTES": "0"},
    "write-ahead": {"BNLAB_WRITE_AHEAD_MIN_BYTES": "0"},
    "no-pool": {"BNLAB_CPU_CACHE_BYTES": "0"},
    # the compiled kernels off: the portable backend (torch ops), which runs without a compiler
    "portable": {"BNLAB_CPU_KERNELS": "0"},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHANNELS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 48, 56, 63, 64, 65, 72, 96, 100, 127, 128, 129,
            256, 257, 512, 1000, 1024, 1100)  # fmt: skip
LAYERS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


# -- drawing a case ------------------------------------------------------------------------------
def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """parts positive integers whose product is about total (log-uniform shares)."""
    weights = [rng.random() + 0.05 for _ in range(parts)]
    logs = [math.log(max(total, 1)) * w / sum(weights) for w in weights]
    return [max(1, round(math.exp(v))) for v in logs]


def draw_case(seed: int, index: int, salt: str = "") -> dict:
    """Case ``index`` of a campaign: every random choice, as a JSON-ready dict (data from its seed)."""
    rng = random.Random(f"{seed}/{salt}/{index}")
    rank = rng.choice((2, 3, 3, 4, 4, 4, 5))
    dtype = rng.choices(list(DTYPES), weights=(70, 10, 10, 10))[0]
    size = rng.choices(("tiny", "small", "medium", "long"), weights=(48, 32, 14, 6))[0]
    c = rng.choice(CHANNELS) if rng.random() < 0.6 else max(1, int(math.exp(rng.uniform(0, math.log(1100)))))
    numel = {"tiny": lambda: rng.randint(1, 600), "small": lambda: int(math.exp(rng.uniform(math.log(600), math.log(65536)))),
             "medium": lambda: int(math.exp(rng.uniform(math.log(65536), math.log(1_500_000)))),
             "long": lambda: int(math.exp(rng.uniform(math.log(20_000), math.log(1_200_000))))}[size]()  # fmt: skip
    if size == "tiny" and rng.random() < 0.3:
        c = rng.choice((1, 2, 3, 4, 8, 16))
    c = min(c, max(1, numel // 2)) if size != "tiny" else c
    m = max(1, numel // c)
    if rank == 2:
        rest = [m]
    elif size == "long":  # rows (the spatial extent) of more than 2048 values
        length = rng.randint(2049, 9000)
        c = max(1, min(c, numel // length))
        rest = [max(1, numel // (length * c))] + _split(rng, length, rank - 2)
        rest[1] = max(rest[1], 2049 // max(1, math.prod(rest[2:])) + 1)
    else:
        rest = _split(rng, m, rank - 1)
        if size == "tiny" and rng.random() < 0.25:
            rest[0] = 1  # a batch of one, L > 1
        if rank >= 4 and rng.random() < 0.15:
            rest = [rest[0] * math.prod(rest[1:])] + [1] * (rank - 2)  # 1x1 maps
    shape = [rest[0], c] + rest[1:]
    if rng.random() < 0.01:
        shape[rng.choice([0] + list(range(2, rank)))] = 0  # an empty batch or spatial dim
    layouts = ["contiguous"] * 6 + ["channels_last"] * 4 + ["channels_first", "permuted", "slice", "expand"]
    layout = rng.choice(layouts)
    data = rng.choices(("normal", "offset", "constant", "nonfinite"), weights=(70, 10, 10, 10))[0]
    if data == "offset" and dtype in ("bfloat16", "float16"):
        data = "normal"  # 16-bit floats hold 1e3 ± 0.01 as a constant
    scale = 10 ** rng.uniform(-2, 2 if dtype != "float16" else 1.3)
    steps = [rng.choices(("train", "train_nograd", "eval", "eval_graph"), weights=(55, 10, 20, 15))[0]
             for _ in range(rng.choice((1, 1, 2, 3)))]  # fmt: skip
    affine = rng.random() < 0.7
    return {
        "seed": rng.getrandbits(31), "layer": LAYERS[rank], "shape": shape, "dtype": dtype, "layout": layout,
        "perm": rng.sample(range(rank), rank), "offset": rng.choice((0, 0, 0, 1, 3, 5, 7, 15)),
        "dy_layout": rng.choice(("same", "same", "same", "contiguous", "channels_last")),
        "affine": affine, "bias": (not affine) or rng.random() < 0.9, "track": rng.random() < 0.8,
        "momentum": rng.choice((0.1, 0.1, round(rng.uniform(0.0, 1.0), 6), None)),
        "eps": float(f"{10 ** rng.uniform(-5, -1):.3g}"), "skip_nonfinite": rng.random() < 0.6,
        "threads": rng.choice((1, 2, 3)), "python_path": rng.random() < 0.15, "x_grad": rng.random() < 0.85,
        "data": data, "scale": scale, "shift": rng.uniform(-3, 3) * scale, "steps": steps,
        "nbt": rng.choice((0, 0, 1, 5)),
        # drawn last, so that the choices above are those of campaigns before it existed
        "dy_data": rng.choices(("normal", "nonfinite"), weights=(90, 10))[0],
        "negative": rng.choices((None, "x", "dy"), weights=(90, 5, 5))[0],  # (fortieth session)
        "vectors": rng.choices((None, *ODD_VECTORS), weights=(88, 4, 4, 4))[0],  # (fortieth session)
    }  # fmt: skip


# -- making tensors ------------------------------------------------------------------------------
def arrange(values: torch.Tensor, layout: str, spec: dict) -> torch.Tensor:
    """A tensor equal to ``values`` (float64 already cast to its dtype) in the given memory layout."""
    rank, offset = values.dim(), spec["offset"]
    if layout in ("contiguous", "same") and offset == 0:
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "slice":  # every other element of the last dim of a wider tensor
        wide = torch.zeros(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "expand":  # stride 0 along the batch: the values of sample 0 repeated
        return values[:1].clone().expand(values.shape)
    order = {"contiguous": list(range(rank)), "channels_last": [0] + list(range(2, rank)) + [1],
             "channels_first": [1, 0] + list(range(2, rank)), "permuted": spec["perm"]}[layout]  # fmt: skip
    dense = values.permute(order).contiguous()
    buf = torch.empty(dense.numel() + offset, dtype=values.dtype)  # offset elements: an unaligned start
    buf[offset:].copy_(dense.reshape(-1))
    inverse = [order.index(i) for i in range(rank)]
    return buf[offset:].view(dense.shape).permute(inverse)


def make_gradient(spec: dict, gen: torch.Generator) -> torch.Tensor:
    """One step's upstream gradient (in the case's dtype, contiguous): normal, with 1-3 NaN/inf
    where the case says so (``dy_data``; cases saved before it existed: normal)."""
    dy = torch.randn(spec["shape"], generator=gen, dtype=torch.float64)
    if spec.get("dy_data", "normal") == "nonfinite" and dy.numel():
        _place_nonfinite(dy, gen)
    return dy.to(DTYPES[spec["dtype"]])


def _place_nonfinite(t: torch.Tensor, gen: torch.Generator) -> None:
    """NaN, +inf or -inf at 1-3 random places of t (in place)."""
    flat = t.view(-1)
    for _ in range(int(torch.randint(1, 4, (), generator=gen))):
        k = int(torch.randint(0, flat.numel(), (), generator=gen))
        flat[k] = (float("nan"), float("inf"), -float("inf"))[int(torch.randint(0, 3, (), generator=gen))]


def make_values(spec: dict, gen: torch.Generator) -> torch.Tensor:
    """One step's input values (in the case's dtype, contiguous)."""
    shape, dtype = spec["shape"], DTYPES[spec["dtype"]]
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if spec["data"] == "offset":
        sign = 1.0 if torch.rand((), generator=gen) < 0.8 else -1.0
        t = sign * 1e3 + 0.01 * t
    else:
        t = t * spec["scale"] + spec["shift"]
    if spec["data"] == "constant" and t.numel():
        chans = torch.rand(shape[1], generator=gen) < 0.3
        const = torch.round(torch.randn(shape[1], generator=gen, dtype=torch.float64) * 100, decimals=3)
        sel = chans.view([1, -1] + [1] * (len(shape) - 2)).expand(shape)
        t = torch.where(sel, const.view([1, -1] + [1] * (len(shape) - 2)).expand(shape), t)
    if spec["data"] == "nonfinite" and t.numel():
        _place_nonfinite(t, gen)
    return t.to(dtype)


# -- comparing -----------------------------------------------------------------------------------
def _np(t) -> np.ndarray:
    return t.detach().resolve_neg().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def _masks(a: np.ndarray) -> tuple:
    return np.isnan(a), np.isposinf(a), np.isneginf(a)


def placed_alike(actual, expected) -> bool:
    """Whether NaN, +inf and -inf sit at the same positions (shapes equal)."""
    a, e = _np(actual), _np(expected)
    return a.shape == e.shape and all(np.array_equal(p, q) for p, q in zip(_masks(a), _masks(e)))


def rel_err(actual, expected, floor: float = 1.0) -> float:
    """max |a - e| over positions finite in both, / max(floor, max finite |e|) (inf: shapes differ)."""
    a, e = _np(actual), _np(expected)
    if a.shape != e.shape:
        return math.inf
    fin = np.isfinite(a) & np.isfinite(e)
    if not fin.any():
        return 0.0
    return float(np.abs(a[fin] - e[fin]).max()) / max(floor, float(np.abs(e[np.isfinite(e)]).max()))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (and -0 to 0)."""
    return a.shape == b.shape and bool(torch.equal(torch.isnan(a), torch.isnan(b))) and bool(
        (a.double().nan_to_num(0.0) == b.double().nan_to_num(0.0)).all())


class Judge:
    """Collects failures, notes and each quantity's worst error as a fraction of its tolerance."""

    def __init__(self, dtype: str = "") -> None:
        self.failures, self.notes, self.worst, self.dtype = [], [], {}, dtype

    def check(self, what: str, ours, theirs, ref, tol: float, floor: float = 1.0) -> None:
        """ours against the reference (always) and torch.nn (where torch.nn is itself accurate)."""
        if not placed_alike(ours, theirs):
            a, t = _np(ours), _np(theirs)
            if a.shape != t.shape:
                self.fail(f"{what}: shape {a.shape}, torch.nn's {t.shape}")
                return
            kinds = {}
            for name, mask in (("NaN", np.isnan), ("inf", np.isposinf), ("-inf", np.isneginf), ("finite", np.isfinite)):
                for other, omask in (("NaN", np.isnan), ("inf", np.isposinf), ("-inf", np.isneginf), ("finite", np.isfinite)):
                    n = int((mask(a) & omask(t)).sum()) if name != other else 0
                    if n:
                        kinds[f"{name} where torch.nn has {other}"] = n
            text = f"{what}: " + ", ".join(f"{k} ({n})" for k, n in kinds.items())
            if placed_alike(ours, ref):  # torch.nn's error, not bnlab's: kept apart from the failures
                self.notes.append(f"torch.nn off the reference: {text}")
            else:
                self.fail(f"{text} (where the reference places them otherwise)")
        elif not placed_alike(ours, ref):
            self.notes.append(f"{what}: NaN/inf placed as torch.nn's, not as the reference's")
        err_ref, torch_ref, err_torch = rel_err(ours, ref, floor), rel_err(theirs, ref, floor), rel_err(ours, theirs, floor)
        key = f"{what.split(' ')[-1]}/{self.dtype}"
        self.worst[key] = max(self.worst.get(key, 0.0), err_ref / tol)
        if err_ref > tol:
            self.fail(f"{what}: {err_ref:.3g} from the float64 reference (tol {tol:g}; torch.nn {torch_ref:.3g})")
        elif err_torch > tol and torch_ref <= tol / 2:
            self.fail(f"{what}: {err_torch:.3g} from torch.nn (tol {tol:g}; torch.nn {torch_ref:.3g} "
                      f"from the reference, ours {err_ref:.3g})")  # fmt: skip
        elif err_torch > tol:
            self.notes.append(f"{what}: torch.nn {torch_ref:.3g} from the reference, ours {err_ref:.3g}")

    def fail(self, text: str) -> None:
        self.failures.append(text)


# -- running a case ------------------------------------------------------------------------------
def _layers(spec: dict, gen: torch.Generator):
    """(bnlab layer, torch.nn layer) with the same random parameters and running statistics."""
    import bnlab

    c, dtype = spec["shape"][1], DTYPES[spec["dtype"]]
    kw = dict(eps=spec["eps"], momentum=spec["momentum"], affine=spec["affine"], track_running_stats=spec["track"],
              bias=spec["bias"], dtype=torch.float64 if dtype == torch.float64 else torch.float32)  # fmt: skip
    ours = getattr(bnlab, spec["layer"])(c, skip_nonfinite=spec["skip_nonfinite"], **kw)
    theirs = getattr(torch.nn, spec["layer"])(c, **kw)
    loc, sd = (1e3, 0.01) if spec["data"] == "offset" else (spec["shift"], spec["scale"])
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.7 + 1)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if ours.running_mean is not None:
            ours.running_mean.copy_(loc + sd * torch.randn(c, generator=gen, dtype=torch.float64))
            ours.running_var.copy_(sd**2 * (0.5 + 1.5 * torch.rand(c, generator=gen, dtype=torch.float64)))
            ours.num_batches_tracked.fill_(spec["nbt"])
    theirs.load_state_dict(ours.state_dict())
    odd_vectors(ours, spec.get("vectors"))
    return ours, theirs



def _call(layer, x: torch.Tensor, dy: torch.Tensor, mode: str, x_grad: bool, python_path: bool) -> dict:
    """One forward (and backward where a graph is made) of layer: y, dx, dw, db, or the error."""
    import contextlib

    from bnlab._fastpath import python_path_only

    layer.train(mode in ("train", "train_nograd"))
    layer.zero_grad(set_to_none=True)
    graph = mode in ("train", "eval_graph")
    leaf = x.detach().requires_grad_(graph and (x_grad or mode == "eval_graph"))
    try:
        with torch.set_grad_enabled(graph), (python_path_only() if python_path else contextlib.nullcontext()):
            y = layer(leaf)
            if graph and y.requires_grad:
                y.backward(dy)
    except Exception as e:  # noqa: BLE001 - compared with torch.nn's behaviour
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    grad = lambda p: None if p is None or p.grad is None else p.grad.detach()  # noqa: E731
    return {"y": y.detach(), "dx": leaf.grad, "dw": grad(layer.weight), "db": grad(layer.bias), "x": leaf}


def _expected(spec, mode, x64, dy64, pre, eps):
    """The float64 reference's y, dx, dw, db and running statistics (None where not updated)."""
    with np.errstate(all="ignore"):  # NaN/inf data make NaN/inf where torch.nn makes them
        return _expected_values(spec, mode, x64, dy64, pre, eps)


def _expected_values(spec, mode, x64, dy64, pre, eps):
    from bnlab import reference as ref

    gamma, beta, rm, rv, nbt = pre
    out = {}
    if mode in ("eval", "eval_graph") and rm is not None:
        out["y"] = ref.forward_eval(x64, rm, rv, gamma, beta, eps)
        shape = [1, -1] + [1] * (x64.ndim - 2)
        c = x64.shape[1]
        invstd = 1.0 / np.sqrt(rv + eps)
        xhat = (x64 - rm.reshape(shape)) * invstd.reshape(shape)
        g = np.ones(c) if gamma is None else gamma
        axes = ref.reduce_axes(x64)
        out.update(dx=dy64 * (g * invstd).reshape(shape), dw=(dy64 * xhat).sum(axis=axes), db=dy64.sum(axis=axes))
        return out
    # BN is invariant to a per-channel shift: centring on a value of each channel first keeps the
    # reference's own rounding (x - mean of a constant channel at 1e3) below the float64 tolerance.
    first = x64.reshape(x64.shape[0], x64.shape[1], -1)[:1, :, :1].reshape([1, -1] + [1] * (x64.ndim - 2))
    shift = np.where(np.isfinite(first), first, 0.0) if x64.size else 0.0
    out["y"], cache = ref.forward_train(x64 - shift, gamma, beta, eps)
    out["dx"], out["dw"], out["db"] = ref.backward(dy64, cache)
    if mode in ("train", "train_nograd") and rm is not None:
        stats = ref.moments(x64)
        bad = not (np.isfinite(stats.mean).all() and np.isfinite(stats.m2 / (stats.count - 1)).all())
        if bad and spec["skip_nonfinite"]:
            out["running"] = (rm, rv, nbt)
        else:
            out["running"] = ref.update_running_stats(rm, rv, stats, spec["momentum"], nbt)
    return out


def run_case(spec: dict) -> dict:
    """Run one case: {"failures": [...], "notes": [...], "worst": {quantity: error / tolerance}}."""
    judge = Judge({"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16"}[spec["dtype"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    try:
        _run_steps(spec, judge)
    except Exception as e:  # noqa: BLE001 - a fault of the harness or of bnlab, reported either way
        judge.fail(f"harness exception {type(e).__name__}: {e}")
    finally:
        torch.set_num_threads(threads)
    return {"failures": judge.failures, "notes": judge.notes, "worst": judge.worst}


def _run_steps(spec: dict, judge: Judge) -> None:
    from bnlab.reference import TOLERANCE  # bnlab is imported in the workers only, under their settings

    gen = torch.Generator().manual_seed(spec["seed"])
    ours, theirs = _layers(spec, gen)
    dtype, tol = DTYPES[spec["dtype"]], TOLERANCE[spec["dtype"]]
    ptol = 1e-9 if dtype == torch.float64 else 2e-4
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    kept = []  # (what, tensor, copy): outputs a later call must not overwrite (the memory pool)
    rank = len(spec["shape"])
    for step, mode in enumerate(spec["steps"]):
        values = make_values(spec, gen)
        dyv = make_gradient(spec, gen)
        dy_layout = spec["layout"] if spec["dy_layout"] == "same" else spec["dy_layout"]
        theirs.load_state_dict(ours.state_dict())  # each step from the same state
        buffers = lambda m: (m.running_mean, m.running_var, m.num_batches_tracked)  # noqa: E731
        pre = [None if v is None else _np(v).copy() for v in (ours.weight, ours.bias)]
        pre += [None, None, 0] if ours.running_mean is None else [
            _np(ours.running_mean).copy(), _np(ours.running_var).copy(),
            int(ours.num_batches_tracked)]  # fmt: skip
        pre_state = {k: v.clone() for k, v in ours.state_dict().items()}
        xa, dya = arrange(values, spec["layout"], spec), arrange(dyv, dy_layout, spec)
        if spec.get("negative") == "x":  # the same values, with torch's negative bit: -x in memory
            xa = torch._neg_view(arrange(-values, spec["layout"], spec))
        elif spec.get("negative") == "dy":
            dya = torch._neg_view(arrange(-dyv, dy_layout, spec))
        # what they hold (an expanded view repeats sample 0)
        values, dyv = xa.contiguous().resolve_neg(), dya.contiguous().resolve_neg()
        a = _call(ours, xa, dya, mode, spec["x_grad"], spec["python_path"])
        b = _call(theirs, arrange(values, spec["layout"], spec), arrange(dyv, dy_layout, spec), mode, spec["x_grad"],
                  False)  # fmt: skip
        what = f"step {step} ({mode})"
        if "error" in a or "error" in b:
            if "error" not in b:
                judge.fail(f"{what}: bnlab raised where torch.nn does not: {a['error']}")
            elif "error" not in a:
                judge.fail(f"{what}: torch.nn raised, bnlab did not: {b['error']}")
            elif a["error"].split(":")[0] != b["error"].split(":")[0]:
                judge.notes.append(f"{what}: bnlab {a['error'][:80]} / torch.nn {b['error'][:80]}")
            if "error" in a and any(not same_values(v, pre_state[k]) for k, v in ours.state_dict().items()):
                judge.fail(f"{what}: bnlab raised but changed its state")
            return
        if not same_values(a["x"].detach(), values):
            judge.fail(f"{what}: the input was changed")
        y = a["y"]
        if y.dtype != dtype or y.shape != values.shape:
            judge.fail(f"{what}: output {y.dtype} {tuple(y.shape)}, expected {dtype} {tuple(values.shape)}")
            return
        if spec["layout"] == "channels_last" and rank in (4, 5) and y.numel() > 0:
            fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
            if not y.is_contiguous(memory_format=fmt):
                judge.fail(f"{what}: channels_last input, output strides {y.stride()}")
        if y.stride() != b["y"].stride() and y.numel() > 1:
            judge.notes.append(f"{what}: output strides unlike torch.nn's ({spec['layout']} input)")
        if values.numel() == 0:
            continue
        x64, dy64 = values.double().numpy(), dyv.double().numpy()
        exp = _expected(spec, mode, x64, dy64, pre, ours.eps)
        judge.check(f"{what} y", y, b["y"], exp["y"], tol)
        m = values.numel() // values.shape[1]
        for name, t, floor in (("dx", tol, 1.0), ("dw", ptol, math.sqrt(m)), ("db", ptol, math.sqrt(m))):
            if (a[name] is None) != (b[name] is None):
                judge.fail(f"{what}: {name} is {a[name] is None and 'None' or 'set'}, torch.nn's is not")
            elif a[name] is not None:
                judge.check(f"{what} {name}", a[name], b[name], exp[name], t, floor)
                kept.append((f"{what} {name}", a[name], a[name].clone()))
        kept.append((f"{what} y", y, y.clone()))
        if ours.running_mean is None:
            continue
        if "running" not in exp:  # no update: the state must not move
            if any(not same_values(v, pre_state[k]) for k, v in ours.state_dict().items()):
                judge.fail(f"{what}: state changed by a call that must not update it")
            continue
        e_rm, e_rv, e_nbt = exp["running"]
        skipped = e_rm is pre[2]  # the guard keeps a non-finite batch out of the averages
        for name, t_ours, t_theirs, e in (("running_mean", ours.running_mean, theirs.running_mean, e_rm),
                                         ("running_var", ours.running_var, theirs.running_var, e_rv)):  # fmt: skip
            if skipped:
                if not same_values(t_ours, pre_state[name]):
                    judge.fail(f"{what} {name}: changed by a non-finite batch with the guard on")
            else:
                judge.check(f"{what} {name}", t_ours, t_theirs, e, rtol)
        if int(ours.num_batches_tracked) != e_nbt:
            judge.fail(f"{what}: num_batches_tracked {int(ours.num_batches_tracked)}, expected {e_nbt} "
                       f"(torch.nn {int(theirs.num_batches_tracked)})")  # fmt: skip
        elif not skipped and int(theirs.num_batches_tracked) != e_nbt:
            judge.fail(f"{what}: num_batches_tracked {e_nbt}, torch.nn's {int(theirs.num_batches_tracked)}")
    if kept and kept[-1][1].numel() * kept[-1][1].element_size() >= 256 << 10:
        with torch.no_grad():  # more calls of the same size, which a pool could serve from kept outputs
            for train in (True, False):
                ours.train(train and values.numel() > values.shape[1])
                ours(arrange(make_values(spec, gen), spec["layout"], spec))
    for what, t, copy in kept:
        if not same_values(t, copy):
            judge.fail(f"{what}: changed by a later call (memory reused while still referenced)")


# -- the campaign --------------------------------------------------------------------------------
def worker(args) -> None:
    """Run cases in this process (its BNLAB_* environment is the setting) until the time is up;
    report each on stdout: START index spec / DONE index result / SUMMARY."""
    from bnlab.backends import select_backend

    backend = select_backend(torch.zeros(2, 3)).name
    expected = "portable" if SETTINGS[args.setting].get("BNLAB_CPU_KERNELS") == "0" else "cpu"
    if backend != expected:
        print(f"FATAL the {expected} backend is not selected ({backend})"
              + (": the kernels did not build" if expected == "cpu" else ""), flush=True)  # fmt: skip
        sys.exit(2)
    if args.cases:
        specs = [json.loads(line) for line in open(args.cases)]
        todo = ((i, s) for i, s in enumerate(specs))
    else:
        todo = ((i, draw_case(args.seed, i, args.setting)) for i in range(args.start, 1 << 62))
    end = time.monotonic() + args.seconds
    for index, spec in todo:
        if not args.cases and time.monotonic() >= end:
            break
        print("START", index, json.dumps(spec), flush=True)
        start = time.perf_counter()
        result = run_case(spec)
        result["seconds"] = round(time.perf_counter() - start, 4)
        print("DONE", index, json.dumps(result), flush=True)
    print("SUMMARY", flush=True)


def run_setting(name: str, env_update: dict, seconds: float, seed: int, out_path: str, bar_pos: int,
                cases_file: str | None = None, hang_s: float = 300.0) -> dict:  # fmt: skip
    """Run the worker for one setting (restarted after a crash) and gather its results."""
    from tqdm import tqdm

    env = {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_")}
    env.update(env_update)
    summary = {"setting": name, "cases": 0, "failing": 0, "crashes": 0, "notes": {}, "kinds": {}, "worst": {}, "seconds": 0.0}
    started, next_index = time.monotonic(), 0
    bar = tqdm(total=int(seconds) if not cases_file else None, desc=f"{name:>12}", position=bar_pos, unit="s",
               leave=True, dynamic_ncols=True, mininterval=2.0)  # fmt: skip
    while True:
        left = seconds - (time.monotonic() - started)
        if left <= 1 and not cases_file:
            break
        # a replay's worker runs every case of its file whatever the time (and refuses seconds <= 0)
        budget = "1" if cases_file else str(left)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--setting", name, "--seed", str(seed),
               "--start", str(next_index), "--seconds", budget] + (["--cases", cases_file] if cases_file else [])  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        current, done = None, False
        while not done:
            try:
                line = lines.get(timeout=hang_s)
            except queue.Empty:
                line = "HANG"
            if line is None or line == "HANG":
                if line == "HANG":
                    proc.kill()
                rc = proc.wait()
                if current is not None:  # the case that was running when the worker died or hung
                    summary["crashes"] += 1
                    summary["failing"] += 1
                    what = "no result within %gs" % hang_s if line == "HANG" else f"worker exited with status {rc}"
                    _record(out_path, name, env_update, current[1], [what])
                    kind = failure_kind(what)
                    summary["kinds"][kind] = summary["kinds"].get(kind, 0) + 1
                    next_index = current[0] + 1
                    tqdm.write(f"[{name}] case {current[0]}: {what}")
                    if cases_file:  # replay: go on after the crashing case
                        with open(cases_file) as f:
                            rest = f.readlines()[current[0] + 1:]
                        if not rest:
                            cases_file = None
                            return summary
                        with open(cases_file, "w") as f:
                            f.writelines(rest)
                    break
                if rc != 0:  # died before its first case or between two: nothing ran that is not counted
                    summary["fatal"] = f"worker exited with status {rc} outside any case"
                    tqdm.write(f"[{name}] {summary['fatal']}")
                done = True
                continue
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "START":
                index, _, payload = rest.partition(" ")
                current = (int(index), json.loads(payload))
            elif kind == "DONE":
                index, _, payload = rest.partition(" ")
                result = json.loads(payload)
                summary["cases"] += 1
                summary["seconds"] += result["seconds"]
                for k, v in result["worst"].items():
                    summary["worst"][k] = max(summary["worst"].get(k, 0.0), v)
                for note in result["notes"]:
                    key = failure_kind(note)
                    summary["notes"][key] = summary["notes"].get(key, 0) + 1
                if result["failures"]:
                    summary["failing"] += 1
                    for kind in {failure_kind(f) for f in result["failures"]}:
                        summary["kinds"][kind] = summary["kinds"].get(kind, 0) + 1
                    _record(out_path, name, env_update, current[1], result["failures"])
                    tqdm.write(f"[{name}] case {index} FAILS: {result['failures'][:3]}")
                current = None
                bar.n = min(bar.total or 1 << 30, int(time.monotonic() - started))
                bar.set_postfix(cases=summary["cases"], failing=summary["failing"], refresh=False)
                bar.update(0)
            elif kind == "FATAL":
                tqdm.write(f"[{name}] {line.strip()}")
                summary["fatal"] = rest
            elif kind != "SUMMARY":
                tqdm.write(f"[{name}] {line.rstrip()}")
        if done:
            break
    bar.close()
    summary["wall_s"] = round(time.monotonic() - started, 1)
    return summary


def failure_kind(text: str) -> str:
    """A failure message without its step and numbers, to count failures of one kind together."""
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", re.sub(r"^step \d+ \((\w+)\):? ", r"\1 ", text))[:100]


def _record(out_path: str, setting: str, env_update: dict, spec: dict, failures: list) -> None:
    with open(out_path, "a") as f:
        f.write(json.dumps({"setting": setting, "env": env_update, "case": spec, "failures": failures}) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=positive_float, default=600.0, help="time budget of the whole campaign (split over settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="all", help=f"comma-separated, from: {', '.join(SETTINGS)} (default all)")
    p.add_argument("--jobs", type=positive_int, default=1, help="settings run at the same time")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "fuzz_kernels_failures.jsonl"))  # fmt: skip
    p.add_argument("--replay", help="a failures file written by --out: run its cases again under their settings")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.replay:
        return replay(args)
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    for name in names:
        if name not in SETTINGS:
            p.error(f"--settings: expected names from {', '.join(SETTINGS)}, got {name!r}")
    per = args.seconds * args.jobs / len(names)
    print(f"{len(names)} settings, {per:.0f} s each, seed {args.seed}, failures to {args.out}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_setting, n, SETTINGS[n], per, args.seed, args.out, i % args.jobs)
                   for i, n in enumerate(names)]  # fmt: skip
        summaries = [f.result() for f in futures]
    _print_summaries(summaries)
    sys.exit(_exit_status(summaries))


def _exit_status(summaries: list) -> int:
    """1 if a case failed or a setting could not run all its cases (its "fatal"), else 0."""
    return 1 if any(s["failing"] or "fatal" in s for s in summaries) else 0


def _print_summaries(summaries: list) -> None:
    print(f"\n{'setting':>12} {'cases':>6} {'failing':>7} {'crashes':>7} {'wall s':>7}  worst error / tolerance")
    for s in summaries:
        worst = " ".join(f"{k}={v:.2g}" for k, v in sorted(s["worst"].items()))
        print(f"{s['setting']:>12} {s['cases']:>6} {s['failing']:>7} {s['crashes']:>7} {s.get('wall_s', 0):>7}  {worst}")
    for s in summaries:
        if "fatal" in s:
            print(f"[{s['setting']}] not every case ran: {s['fatal']}")
    kinds: dict = {}
    for s in summaries:
        for k, v in s["kinds"].items():
            kinds[f"{k} [{s['setting']}]"] = v
    if kinds:
        print("\nfailing cases by kind of failure [setting]:")
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {v:6d}  {k}")
    notes: dict = {}
    for s in summaries:
        for k, v in s["notes"].items():
            notes[k] = notes.get(k, 0) + v
    if notes:
        print("\nnotes (not failures), by count:")
        for k, v in sorted(notes.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {v:6d}  {k}")


def replay(args) -> None:
    """Run the cases of a failures file again, each under its setting; prints what fails now."""
    import tempfile

    entries = [json.loads(line) for line in open(args.replay) if line.strip()]
    by_setting: dict = {}
    for e in entries:
        by_setting.setdefault(e["setting"], []).append(e)
    summaries = []
    out = args.out + ".replay" if os.path.abspath(args.out) == os.path.abspath(args.replay) else args.out
    for i, (name, group) in enumerate(by_setting.items()):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.writelines(json.dumps(e["case"]) + "\n" for e in group)
        summary = run_setting(name, group[0]["env"], 0, 0, out, 0, cases_file=f.name)
        os.unlink(f.name)
        if summary["cases"] + summary["crashes"] < len(group) and "fatal" not in summary:
            summary["fatal"] = f"{summary['cases'] + summary['crashes']} of {len(group)} cases ran"
        summaries.append(summary)
    _print_summaries(summaries)
    print(f"failing cases (again) written to {out}")
    sys.exit(_exit_status(summaries))


if __name__ == "__main__":
    main()
