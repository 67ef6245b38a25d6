"""Differential fuzzing of bnlab's Triton path against torch.nn and the float64 reference.

Each case is drawn at random from a seed and an index (so any case can be rerun alone) and runs
one of bnlab.BatchNorm1d/2d/3d or bnlab.BatchNormAct2d (activation="relu", residual False/True)
with the Triton backend first in the registry (TritonBackend(allow_cpu=True): CPU tensors run the
kernels in Triton's interpreter, as tests/test_triton.py routes them), in one of these modes:

- train: one or two training steps, forward and backward (y, dx, dweight, dbias, dresidual, the
  running averages and num_batches_tracked), sometimes followed by an eval-mode call;
- train_nograd: a training forward under torch.no_grad (output and state);
- eval_nograd: eval mode under torch.no_grad (running statistics, or the batch's own when the
  layer does not track them);
- eval_graph: eval mode with a graph (frozen statistics), forward and backward.

Drawn per case: dtype (float32 mostly; float16/bfloat16 inputs with float32 parameters; float64,
which the Triton backend declines and the portable backend must handle), layout (NCHW contiguous,
channels-last, and now and then a non-dense one, which runs on a contiguous copy), shapes that cross the plan
and tile boundaries of triton_plan/triton_small (channel counts around the block sizes, rows of 1,
N=1, many channels with tiny rows, few channels with long rows, sizes that are not powers of two),
parameters and running statistics now and then in views (fuzz_odd_vectors: step-sliced, negative
bit, unaligned), momentum None/0.1/other, affine, bias, track_running_stats, skip_nonfinite, eps, and the values
(randn; 1e3 + 0.01·randn; wide ranges of means and scales; constant channels; occasional inf/NaN),
and the upstream gradient (randn, or with one or two inf/NaN, as an overflowing loss makes).
Also drawn, as the command-line knobs of benchmarks/bench_bn.py and triton_tune.py allow: the
tiles (triton_plan.Tiles: the interpreter's, the GPU's, triton_tune's candidates, random valid
ones), the programs a plan aims at (4 in the interpreter, 4 x 132 on an H100), SMALL_NUMEL (the
one-program kernels' bound), MERGE_IN_TILES_MAX, and the eval kernel choice.

Oracles: the float64 reference (bnlab.reference; DEVELOPERS.md's tolerances: 2e-4 for float32,
2e-2 bf16, 4e-3 fp16, 1e-9 float64, relative to max(1, max|expected|)), and torch.nn (BatchNorm*d,
or BatchNorm2d -> (+ residual) -> ReLU with the same parameters) where torch.nn is accurate (it is
~1e-2 off at 1e3 ± 0.01, so it is not asked about values there). NaN/inf positions are compared
with torch.nn's everywhere; where they differ, bnlab's must be the reference's (torch.nn is then off
the reference, counted in torch_off). A failure is a result outside tolerance, a NaN/inf in another place,
a crash or an exception torch.nn does not raise, a state difference (running averages, counter),
a wrong dtype/strides, or a silent fallback: the Triton entry points (triton_ops.forward_train,
backward, normalize_with) must run, and the portable backend must not, for every input the
Triton backend claims (float32/16/bf16, NCHW or channels-last), and neither for the others.
ReLU's gradient at a pre-activation within tolerance of 0 is undefined between implementations:
dy is zeroed there. At a NaN pre-activation torch.relu gives NaN and passes dy back (the oracle
here). torch.nn is asked about a value only where it is itself within tolerance of the float64
reference (counted as "torch_off" otherwise); float64's 1e-9 is widened by the data's |x|/std.

Each failing case is written as one JSON line (the case's spec, which rebuilds every tensor with
this version of the script, and what differs); rerun them with --replay, or one case of a
campaign with --seed S --start I --cases 1.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fuzz_triton.py --seconds 600
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fuzz_triton.py --cases 200 --seed 3
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fuzz_triton.py --replay fuzz_triton_failures.jsonl

Without a GPU, TRITON_INTERPRET=1 must be set before triton is imported (this script sets it by
default when it is absent). tests/test_fuzz_triton.py runs a few cases of it. The cases are drawn in
fuzz_triton_cases.py, their inputs made and their results checked in fuzz_triton_oracle.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bnlab  # noqa: E402
from bnlab import reference as ref  # noqa: E402
from bench_cases import positive_float, positive_int  # noqa: E402
from fuzz_triton_cases import DTYPES, draw_case  # noqa: E402
from fuzz_odd_vectors import odd_vectors  # noqa: E402
from fuzz_triton_oracle import TOL, Checker, _cast_layout, _np, make_x  # noqa: E402

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: kernels launched by bnlab.backends.triton_ops, recorded per case
KERNELS = {
    "triton_reduce": ("stats_ncl_kernel", "stats_nlc_kernel", "stats_merge_kernel"),
    "triton_grad": ("grad_ncl_kernel", "grad_nlc_kernel", "grad_merge_kernel"),
    "triton_elementwise": ("normalize_kernel", "grad_input_kernel", "grad_input_merged_kernel", "eval_coef_kernel",
                           "eval_kernel"),
    "triton_small": ("small_forward_kernel", "small_backward_kernel", "small_eval_kernel"),
}  # fmt: skip
ENTRY_POINTS = ("forward_train", "backward", "normalize_with", "grad_input_with")
PORTABLE_METHODS = ("moments", "grad_sums", "normalize", "grad_input", "forward_train", "backward")


# ------------------------------------------------------------------------------------------------
# Routing, knobs and recording
# ------------------------------------------------------------------------------------------------

_STATE: dict = {}


def _setup():
    """Import the Triton modules once (needs triton); returns them.

    Also sets up the layers' compiled layer call, with the CPU backend still registered: then the
    cases' layer calls, with Triton chosen, take its route for calls the CPU kernels do not take
    (backends/cpu_kernels_py_device.inc), as on a GPU machine, instead of nn.Module.__call__.
    """
    if not _STATE:
        with torch.no_grad():
            bnlab.BatchNorm1d(2).eval()(torch.randn(3, 2))
        from bnlab.backends import PortableBackend, triton_ops, triton_plan
        from bnlab.backends import triton_elementwise, triton_grad, triton_reduce, triton_small
        from bnlab.backends.triton_backend import TritonBackend

        _STATE.update(
            ops=triton_ops, plan=triton_plan, backend=TritonBackend(allow_cpu=True), portable=PortableBackend,
            kernel_modules={"triton_reduce": triton_reduce, "triton_grad": triton_grad,
                            "triton_elementwise": triton_elementwise, "triton_small": triton_small},
        )  # fmt: skip
    return _STATE


class _KernelProbe:
    """Stands in for a @triton.jit kernel in its module: records each launch, then launches it."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def triton_session(knobs: dict, spec_shape_numel: int, log: list):
    """Triton first in the registry (then portable), the case's knobs, and every launch, Triton entry
    point and portable primitive recorded in ``log``."""
    st = _setup()
    from bnlab.backends import _REGISTRY

    ops, plan_mod = st["ops"], st["plan"]
    with contextlib.ExitStack() as stack:
        saved = list(_REGISTRY)
        _REGISTRY[:] = [st["backend"], st["portable"]()]
        stack.callback(lambda: _REGISTRY.__setitem__(slice(None), saved))
        tiles = plan_mod.Tiles(*knobs["tiles"])
        stack.enter_context(_patched(plan_mod, "_INTERPRETER_TILES", tiles))
        wanted = knobs["wanted"]
        stack.enter_context(_patched(plan_mod, "_programs_wanted", lambda x, gpu, _w=wanted: _w))
        small = knobs["small_numel"]
        if small == "edge":
            small = spec_shape_numel - (spec_shape_numel % 2)  # the input's own size or one below
        if small != "default":
            stack.enter_context(_patched(ops, "SMALL_NUMEL", int(small)))
        if knobs["merge_max"] != "default":
            stack.enter_context(_patched(ops, "MERGE_IN_TILES_MAX", int(knobs["merge_max"])))
        if knobs["eval_one"] != "default":
            forced = bool(knobs["eval_one"])
            stack.enter_context(_patched(ops, "eval_one_launch", lambda p, _f=forced: _f))
        for module_name, names in KERNELS.items():
            module = st["kernel_modules"][module_name]
            for name in names:
                stack.enter_context(_patched(module, name, _KernelProbe(name, getattr(module, name), log)))
        for name in ENTRY_POINTS:
            original = getattr(ops, name)

            def entry(*a, _f=original, _n=name, **k):
                log.append("triton." + _n)
                return _f(*a, **k)

            stack.enter_context(_patched(ops, name, entry))
        portable = st["portable"]
        for name in PORTABLE_METHODS:
            original = getattr(portable, name)

            def method(self, *a, _f=original, _n=name, **k):
                log.append("portable." + _n)
                return _f(self, *a, **k)

            stack.enter_context(_patched(portable, name, method))
        stack.enter_context(_patched(plan_mod, "_PLANS", {}))
        yield


# ------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------


def _layer_classes(kind: str, rank: int):
    if kind.startswith("act"):
        return bnlab.BatchNormAct2d, torch.nn.BatchNorm2d
    d = {"bn1d": 1, "bn2d": 2, "bn3d": 3}[kind]
    return getattr(bnlab, f"BatchNorm{d}d"), getattr(torch.nn, f"BatchNorm{d}d")


def _triton_claims(x: torch.Tensor) -> bool:
    """Whether the Triton backend should run x (independently of triton_plan): a float32/16/bf16
    tensor with elements, contiguous or with channels innermost and dense."""
    if x.dtype not in TRITON_DTYPES or x.numel() == 0:
        return False
    return x.is_contiguous() or x.movedim(1, -1).is_contiguous()


def _triton_copies(x: torch.Tensor) -> bool:
    """Whether the Triton backend runs x on a contiguous copy (TritonBackend.kernel_input): a
    float32/16/bf16 tensor with elements in other strides (a permuted dense view's elementwise
    passes excepted, which stay portable)."""
    return x.dtype in TRITON_DTYPES and x.numel() > 0 and not _triton_claims(x)


def _expected_path(ck: Checker, phase: str, log: list, claims: bool, entry: str | None, copies: bool = False):
    """The Triton entry point ``entry`` ran (and portable did not) when Triton claims the input;
    for a view it runs on a copy (``copies``), Triton kernels in a training step's statistics and
    gradients; no Triton launch for the inputs it declines (float64)."""
    triton = [e for e in log if e.startswith("triton.")]
    portable = [e for e in log if e.startswith("portable.")]
    kernels = [e for e in log if "." not in e]
    if claims:
        if entry is not None:
            ck.true(f"{phase}: Triton path", "triton." + entry in triton,
                    f"expected triton_ops.{entry}; recorded {sorted(set(log))}")  # fmt: skip
        ck.true(f"{phase}: no portable fallback", not portable, f"portable ran: {sorted(set(portable))}")
    elif copies:
        if entry in ("forward_train", "backward"):
            ck.true(f"{phase}: a view's training step runs Triton kernels on its copy", bool(kernels),
                    f"recorded {sorted(set(log))}")  # fmt: skip
    else:
        ck.true(f"{phase}: declined input takes no Triton kernel", not kernels and not triton,
                f"recorded {sorted(set(log))}")  # fmt: skip


def _amb_threshold(dtype) -> float:
    return max(1e-4, 2 * TOL[dtype])


def run_case(spec: dict) -> dict:
    """Run one case; returns {"failures": [...], "kernels": [...], "checks": n, "seconds": s}."""
    t0 = time.perf_counter()
    ck = Checker()
    log: list = []
    numel = math.prod(spec["shape"])
    try:
        with triton_session(spec["knobs"], numel, log), np.errstate(all="ignore"):
            _run(spec, ck, log)
    except Exception as exc:  # a crash of the harness or of bnlab outside the compared calls
        ck.fail("crash", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:])
    kernels = sorted({e for e in log if "." not in e})
    return {"failures": ck.failures, "kernels": kernels, "checks": ck.checks, "skipped": ck.skipped,
            "torch_off": ck.torch_off,
            "seconds": time.perf_counter() - t0}


def _run(spec: dict, ck: Checker, log: list) -> None:
    gen = torch.Generator().manual_seed(spec["seed"])
    shape = spec["shape"]
    c, nd = shape[1], len(shape)
    dtype = DTYPES[spec["dtype"]]
    kind, mode = spec["kind"], spec["mode"]
    act, residual = kind.startswith("act"), kind == "act_res"
    ours_cls, theirs_cls = _layer_classes(kind, nd)
    common = dict(eps=spec["eps"], momentum=spec["momentum"], affine=spec["affine"],
                  track_running_stats=spec["track"], bias=spec["bias"])  # fmt: skip
    if act:
        ours = ours_cls(c, residual=residual, **common)
        ours.skip_nonfinite = spec["guard"]
    else:
        ours = ours_cls(c, skip_nonfinite=spec["guard"], **common)
    theirs = theirs_cls(c, **common)
    with torch.no_grad():
        if ours.weight is not None:
            w = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)) * torch.where(
                torch.rand(c, generator=gen) < 0.15, -1.0, 1.0).double()  # fmt: skip
            ours.weight.copy_(w)
            theirs.weight.copy_(w)
        if ours.bias is not None:
            b = torch.randn(c, generator=gen, dtype=torch.float64)
            ours.bias.copy_(b)
            theirs.bias.copy_(b)
        eval_x64 = make_x(spec, gen) if mode.startswith("eval") else None
        if ours.running_mean is not None:
            rm = torch.randn(c, generator=gen, dtype=torch.float64) * 2
            rv = 0.2 + 3 * torch.rand(c, generator=gen, dtype=torch.float64)
            if eval_x64 is not None:  # statistics near the data's, so that y stays in the dtype's range
                seen = eval_x64.to(dtype).double().movedim(1, 0).reshape(c, -1)
                seen = torch.where(torch.isfinite(seen), seen, torch.zeros_like(seen))
                mean, var = seen.mean(1), seen.var(1, unbiased=False) if seen.shape[1] > 1 else torch.zeros(c).double()
                rm = mean + 0.3 * var.sqrt() * torch.randn(c, generator=gen, dtype=torch.float64)
                rv = var * 10 ** (torch.rand(c, generator=gen, dtype=torch.float64) - 0.5)
            if spec["zero_var"] and dtype is not torch.float16:
                rv[torch.rand(c, generator=gen) < 0.3] = 0.0
            if spec["negative_var"]:
                rv[int(torch.randint(c, (1,), generator=gen))] = -0.5
            for layer in (ours, theirs):
                layer.running_mean.copy_(rm)
                layer.running_var.copy_(rv)
                layer.num_batches_tracked.fill_(spec["nbt0"])
    if dtype is torch.float64:
        theirs.double()
        if spec["f64_params"]:
            ours.double()
    if spec["frozen_params"]:
        for p in list(ours.parameters()) + list(theirs.parameters()):
            p.requires_grad_(False)
    odd_vectors(ours, spec.get("vectors"))  # the same values in views the kernels must not take as they are
    # float64 copies of the state, updated by the reference as the steps go
    state = None
    if ours.running_mean is not None:
        state = [_np(ours.running_mean), _np(ours.running_var), int(ours.num_batches_tracked)]
    w64 = _np(ours.weight) if ours.weight is not None else None
    b64 = _np(ours.bias) if ours.bias is not None else None
    eps = spec["eps"]
    tol = TOL[dtype]
    buf_tol = 1e-9 if ours.running_mean is not None and ours.running_mean.dtype == torch.float64 else 1e-6
    trust_torch = spec["values"] in ("randn", "nonfinite", "tiny")

    if mode.startswith("train"):
        ours.train(), theirs.train()
        for step in range(spec["steps"]):
            x64 = make_x(spec, gen)
            ok = _step(spec, ck, log, ours, theirs, x64, gen, w64, b64, eps, tol, trust_torch, state, buf_tol,
                       f"step {step}", training=True, backward=mode == "train")  # fmt: skip
            if not ok:
                return
        if spec["then_eval"]:
            ours.eval(), theirs.eval()
            if ours.running_mean is not None:
                state = [_np(ours.running_mean), _np(ours.running_var), int(ours.num_batches_tracked)]
                with torch.no_grad():
                    theirs.running_mean.copy_(ours.running_mean)
                    theirs.running_var.copy_(ours.running_var)
            x64 = make_x(dict(spec, values="randn" if spec["values"] == "nonfinite" else spec["values"]), gen)
            _step(spec, ck, log, ours, theirs, x64, gen, w64, b64, eps, tol, trust_torch, state, buf_tol,
                  "eval after training", training=False, backward=False)  # fmt: skip
    else:
        ours.eval(), theirs.eval()
        x64 = eval_x64
        _step(spec, ck, log, ours, theirs, x64, gen, w64, b64, eps, tol, trust_torch, state, buf_tol, mode,
              training=False, backward=mode == "eval_graph")  # fmt: skip


def _place_nonfinite(t: torch.Tensor, gen: torch.Generator) -> None:
    """NaN, +inf or -inf at one or two random places of t (in place)."""
    flat = t.view(-1)
    for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
        i = int(torch.randint(flat.numel(), (1,), generator=gen))
        flat[i] = [float("nan"), float("inf"), float("-inf")][int(torch.randint(3, (1,), generator=gen))]


def _step(spec, ck, log, ours, theirs, x64, gen, w64, b64, eps, tol, trust_torch, state, buf_tol, phase, training,
          backward) -> bool:  # fmt: skip
    """One call of both layers on x (and backward); compares everything. False: stop the case."""
    dtype = DTYPES[spec["dtype"]]
    shape = spec["shape"]
    nd = len(shape)
    act, residual = spec["kind"].startswith("act"), spec["kind"] == "act_res"
    x64 = x64.clone()
    x = _cast_layout(x64, dtype, spec["layout"])
    xq = x.double()  # the values the layers see
    dy_layout = spec["layout"] if spec["dy_layout"] == "same" else spec["dy_layout"]
    res_layout = spec["layout"] if spec["res_layout"] == "same" else spec["res_layout"]
    r = r64 = None
    if residual:
        r64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
        if spec["values"] == "nonfinite" and bool(torch.rand((), generator=gen) < 0.5):
            _place_nonfinite(r64, gen)  # a NaN/inf in the residual too (an fp16 overflow upstream, say)
        r = _cast_layout(r64, dtype, res_layout)
    dy64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** (2 * torch.rand((), generator=gen).item() - 1)
    if spec.get("dy_values", "randn") == "nonfinite" and dy64.numel():  # as an overflowing loss makes
        _place_nonfinite(dy64, gen)
    batch_stats = training or ours.running_mean is None
    # the reference, in float64, on the values the layers see
    xn = _np(xq)
    if batch_stats:
        y_ref, cache = ref.forward_train(xn, w64, b64, eps)
    else:
        rm, rv = _np(ours.running_mean), _np(ours.running_var)
        y_ref = ref.forward_eval(xn, rm, rv, w64, b64, eps)
        cache = None
    if dtype is torch.float64:
        # float64's 1e-9 holds for well-conditioned data; a channel at 1e6 ± 1e-4 loses |x|/std
        # ulps in its mean in any float64 computation (the reference's too)
        with np.errstate(all="ignore"):
            axes_ = (0,) + tuple(range(2, nd))
            spread = np.sqrt(np.nanvar(np.where(np.isfinite(xn), xn, np.nan), axis=axes_) + eps)
            top = np.nanmax(np.abs(np.where(np.isfinite(xn), xn, np.nan)), axis=axes_)
            cond = float(np.nanmax(top / spread)) if np.isfinite(top / spread).any() else 1.0
        tol = max(tol, 1e-14 * cond)
    z_ref = y_ref + (_np(r) if residual else 0.0)
    out_ref = np.where(z_ref > 0, z_ref, np.where(np.isnan(z_ref), np.nan, 0.0)) if act else z_ref
    if act:  # ReLU's gradient is undefined between implementations at a pre-activation near 0
        finite = np.isfinite(z_ref)
        scale = max(1.0, float(np.abs(z_ref[finite]).max())) if finite.any() else 1.0
        amb = finite & (np.abs(z_ref) <= _amb_threshold(dtype) * scale)
        dy64 = torch.where(torch.as_tensor(amb), torch.zeros_like(dy64), dy64)
    axes = (0,) + tuple(range(2, nd))

    def reference_grads(dy64):
        dz = _np(dy64.to(dtype).double())
        if act:  # torch.relu's gradient: 0 where the output is <= 0, dy elsewhere (NaN included)
            dz = np.where(z_ref <= 0, 0.0, dz)
        if batch_stats:
            return (dz, *ref.backward(dz, cache))
        invstd = 1.0 / np.sqrt(_np(ours.running_var) + eps)
        g = w64 if w64 is not None else np.ones(shape[1])
        dx = dz * (g * invstd).reshape([1, -1] + [1] * (nd - 2))
        view = [1, -1] + [1] * (nd - 2)
        xhat = (xn - _np(ours.running_mean).reshape(view)) * invstd.reshape(view)
        return dz, dx, (dz * xhat).sum(axes), dz.sum(axes)

    grads_ref = reference_grads(dy64) if backward else None
    if backward and dtype is torch.float16:  # keep dx within float16's range: scale dy down
        finite = np.isfinite(grads_ref[1])
        top = float(np.abs(grads_ref[1][finite]).max()) if finite.any() else 0.0
        if top > 1e4:
            dy64 = dy64 * (1e4 / top)
            grads_ref = reference_grads(dy64)
    dy = _cast_layout(dy64, dtype, dy_layout)
    claims, copies = _triton_claims(x), _triton_copies(x)

    # --- ours -----------------------------------------------------------------------------------
    want_x_grad = backward and spec["x_grad"]
    # fresh tensors in the case's layouts: clone() of a non-dense tensor would make it contiguous
    x1 = _cast_layout(x64, dtype, spec["layout"]).requires_grad_(want_x_grad)
    r1 = _cast_layout(r64, dtype, res_layout).requires_grad_(backward) if residual else None
    ours_exc = theirs_exc = None
    start = len(log)
    y1 = None
    try:
        ctx = torch.no_grad() if not backward else contextlib.nullcontext()
        with ctx:
            y1 = ours(x1, r1) if residual else ours(x1)
    except Exception as exc:
        ours_exc = exc
    fwd_log = log[start:]
    # --- torch.nn ---------------------------------------------------------------------------------
    x2 = _cast_layout(x64, dtype, spec["layout"]).requires_grad_(want_x_grad)
    r2 = _cast_layout(r64, dtype, res_layout).requires_grad_(backward) if residual else None
    y2 = None
    try:
        with torch.no_grad() if not backward else contextlib.nullcontext():
            z2 = theirs(x2)
            if residual:
                z2 = z2 + r2
            y2 = torch.relu(z2) if act else z2
    except Exception as exc:
        theirs_exc = exc
    negative = spec["negative_var"] and not batch_stats
    if negative:  # bnlab refuses a negative running variance (torch.nn returns NaN): documented
        ck.true(f"{phase}: negative running_var refused", isinstance(ours_exc, ValueError)
                and "running_var" in str(ours_exc), f"got {ours_exc!r}")  # fmt: skip
        return False
    if ours_exc is not None or theirs_exc is not None:
        if ours_exc is not None and theirs_exc is None:
            ck.fail(f"{phase}: exception torch.nn does not raise",
                    "".join(traceback.format_exception(type(ours_exc), ours_exc, ours_exc.__traceback__))[-3000:])
        elif ours_exc is None:
            ck.fail(f"{phase}: torch.nn raises, bnlab does not", repr(theirs_exc))
        return False
    fwd_entry = "forward_train" if batch_stats else "normalize_with"
    _expected_path(ck, f"{phase} forward", fwd_log, claims, fwd_entry, copies)
    ck.true(f"{phase}: y dtype", y1.dtype == x.dtype, f"{y1.dtype} != {x.dtype}")
    if claims:
        ck.true(f"{phase}: y strides", y1.stride() == x.stride(), f"{y1.stride()} != x's {x.stride()}")
    lim = torch.finfo(dtype).max / 2
    ck.close(f"{phase}: y vs float64 reference", y1, out_ref, tol, lim)
    ck.placed(f"{phase}: y NaN/inf vs torch.nn", y1, y2, out_ref)
    if trust_torch:
        ck.close_torch(f"{phase}: y vs torch.nn", y1, y2, out_ref, tol)

    # --- backward ---------------------------------------------------------------------------------
    grads_wanted = backward and (y1.requires_grad and y2.requires_grad)
    if backward:
        ck.true(f"{phase}: graph recorded as torch.nn's", y1.requires_grad == y2.requires_grad,
                f"ours requires_grad={y1.requires_grad}, torch.nn's {y2.requires_grad}")  # fmt: skip
    if grads_wanted:
        start = len(log)
        try:
            y1.backward(dy)
        except Exception as exc:
            ck.fail(f"{phase}: backward raised",
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:])
            return False
        bwd_log = log[start:]
        y2.backward(dy)
        _expected_path(ck, f"{phase} backward", bwd_log, claims, "backward" if batch_stats else None, copies)
        dz, dx_ref, dw_ref, db_ref = grads_ref
        if spec["x_grad"]:
            ck.true(f"{phase}: dx dtype", x1.grad is not None and x1.grad.dtype == x.dtype,
                    f"{None if x1.grad is None else x1.grad.dtype}")  # fmt: skip
            if x1.grad is not None:
                if claims and batch_stats:
                    ck.true(f"{phase}: dx strides", x1.grad.stride() == x.stride(),
                            f"{x1.grad.stride()} != x's {x.stride()}")  # fmt: skip
                ck.close(f"{phase}: dx vs float64 reference", x1.grad, dx_ref, tol, lim)
                ck.placed(f"{phase}: dx NaN/inf vs torch.nn", x1.grad, x2.grad, dx_ref)
                if trust_torch:
                    ck.close_torch(f"{phase}: dx vs torch.nn", x1.grad, x2.grad, dx_ref, tol)
        ptol = max(tol, 2e-4)
        for name, ref_grad in (("weight", dw_ref), ("bias", db_ref)):
            p1, p2 = getattr(ours, name), getattr(theirs, name)
            if p1 is None or not p1.requires_grad:
                continue
            ck.close(f"{phase}: d{name} vs float64 reference", p1.grad, ref_grad, ptol)
            ck.placed(f"{phase}: d{name} NaN/inf vs torch.nn", p1.grad, p2.grad, ref_grad)
            if trust_torch:
                ck.close_torch(f"{phase}: d{name} vs torch.nn", p1.grad, p2.grad, ref_grad, ptol)
            p1.grad = p2.grad = None
        if residual:
            ck.close(f"{phase}: dresidual vs float64 reference", r1.grad, dz, tol, lim)
            ck.placed(f"{phase}: dresidual NaN/inf vs torch.nn", r1.grad, r2.grad, dz)
            if trust_torch:
                ck.close_torch(f"{phase}: dresidual vs torch.nn", r1.grad, r2.grad, dz, tol)

    # --- state ------------------------------------------------------------------------------------
    if training and state is not None:
        mom = spec["momentum"]
        st = ref.moments(xn)
        m = st.count
        counted = state[2] + 1
        factor = (1.0 / counted) if mom is None else mom
        unbiased = st.m2 / (m - 1) if m > 1 else None
        accepted = True
        if spec["guard"] and unbiased is not None:
            accepted = bool(np.isfinite(st.mean).all() and np.isfinite(unbiased).all())
        if accepted and unbiased is not None:
            state[0] = state[0] * (1 - factor) + st.mean * factor
            state[1] = state[1] * (1 - factor) + unbiased * factor
        state[2] = counted if accepted else state[2]
        ck.close(f"{phase}: running_mean vs float64 reference", ours.running_mean, state[0], buf_tol)
        ck.close(f"{phase}: running_var vs float64 reference", ours.running_var, state[1], buf_tol)
        ck.true(f"{phase}: num_batches_tracked", int(ours.num_batches_tracked) == state[2],
                f"got {int(ours.num_batches_tracked)}, expected {state[2]}")  # fmt: skip
        if spec["values"] == "randn" and accepted:
            ck.close_torch(f"{phase}: running_mean vs torch.nn", ours.running_mean, theirs.running_mean, state[0], 1e-5)
            ck.close_torch(f"{phase}: running_var vs torch.nn", ours.running_var, theirs.running_var, state[1], 1e-5)
            ck.true(f"{phase}: num_batches_tracked vs torch.nn",
                    int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) - (0 if accepted else 1),
                    f"{int(ours.num_batches_tracked)} vs {int(theirs.num_batches_tracked)}")  # fmt: skip
        # keep torch.nn's state equal to ours (the guard may have skipped a batch torch.nn took)
        with torch.no_grad():
            theirs.running_mean.copy_(ours.running_mean)
            theirs.running_var.copy_(ours.running_var)
            theirs.num_batches_tracked.copy_(ours.num_batches_tracked)
    elif state is not None:  # eval leaves the state alone
        ck.true(f"{phase}: eval leaves num_batches_tracked", int(ours.num_batches_tracked) == state[2])
        ck.close(f"{phase}: eval leaves running_mean", ours.running_mean, state[0], 0.0)
        ck.close(f"{phase}: eval leaves running_var", ours.running_var, state[1], 0.0)
    return True


# ------------------------------------------------------------------------------------------------
# Campaign
# ------------------------------------------------------------------------------------------------


def _label(spec: dict) -> str:
    return f"{spec['kind']}/{spec['mode']}/{spec['dtype']}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=positive_float, default=600.0, help="wall-clock budget (stop drawing cases after it)")
    p.add_argument("--cases", type=positive_int, default=None, help="stop after this many cases (overrides --seconds)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: case i is drawn from (seed, i)")
    p.add_argument("--start", type=int, default=0, help="index of the first case")
    p.add_argument("--max-numel", type=positive_int, default=24_000, help="largest input drawn (values), with big tiles")
    p.add_argument("--out", default=None, help="JSON lines of failing cases (default "
                   "benchmarks/results/fuzz_triton_seed<seed>.jsonl, beside fuzz_kernels.py's, wherever it is run from)")
    p.add_argument("--replay", default=None, help="rerun the cases of a JSON-lines file (its 'spec' fields)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (the interpreter is single-threaded)")
    args = p.parse_args(argv)
    try:
        _setup()
    except ImportError as exc:
        p.error(f"needs triton: {exc}")
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    if args.replay:
        specs = [json.loads(line)["spec"] for line in open(args.replay) if line.strip()]
        bad = 0
        for spec in specs:
            res = run_case(spec)
            bad += bool(res["failures"])
            print(json.dumps({"spec": spec, "failures": res["failures"], "kernels": res["kernels"]}))
        print(f"replayed {len(specs)} cases: {bad} failing", file=sys.stderr)
        return 1 if bad else 0

    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or os.path.join(results, f"fuzz_triton_seed{args.seed}.jsonl")
    open(out, "w").close()
    t_start = time.perf_counter()
    by_label: dict = defaultdict(lambda: [0, 0.0, 0])  # cases, seconds, failing
    kernel_count: Counter = Counter()
    failure_count: Counter = Counter()
    extra: Counter = Counter()
    n_cases = n_bad = 0
    total = args.cases if args.cases is not None else None
    bar = tqdm(total=total if total is not None else int(args.seconds), unit="case" if total else "s",
               dynamic_ncols=True, mininterval=2.0)  # fmt: skip
    index = args.start
    while True:
        elapsed = time.perf_counter() - t_start
        if (args.cases is not None and n_cases >= args.cases) or (args.cases is None and elapsed >= args.seconds):
            break
        spec = draw_case(args.seed, index, args.max_numel)
        res = run_case(spec)
        n_cases += 1
        stats = by_label[_label(spec)]
        stats[0] += 1
        stats[1] += res["seconds"]
        kernel_count.update(res["kernels"])
        extra.update(checks=res["checks"], skipped=res["skipped"], torch_off=res["torch_off"])
        if res["failures"]:
            n_bad += 1
            stats[2] += 1
            for f in res["failures"]:
                failure_count[f"{spec['kind']}: {f['check'].split(': ', 1)[-1]}"] += 1
            line = {"seed": args.seed, "index": index, "spec": spec, "failures": res["failures"],
                    "kernels": res["kernels"], "seconds": round(res["seconds"], 3),
                    "repro": f"TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fuzz_triton.py --seed {args.seed} "
                             f"--start {index} --cases 1"}  # fmt: skip
            with open(out, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        index += 1
        if total is not None:
            bar.update(1)
        else:
            bar.n = min(int(time.perf_counter() - t_start), int(args.seconds))
            bar.refresh()
        bar.set_postfix(cases=n_cases, failing=n_bad)
    bar.close()
    wall = time.perf_counter() - t_start
    print(f"\n{n_cases} cases in {wall:.0f} s (seed {args.seed}, indices {args.start}..{index - 1}); "
          f"{n_bad} failing, written to {out}")  # fmt: skip
    print(f"checks {extra['checks']}; skipped for the dtype's overflow {extra['skipped']}; torch.nn comparisons "
          f"left out where torch.nn is itself off the float64 reference {extra['torch_off']}")
    for part, name in ((0, "kind"), (1, "mode"), (2, "dtype")):
        totals: dict = defaultdict(lambda: [0, 0.0, 0])
        for label, (cases, secs, bad) in by_label.items():
            key = label.split("/")[part]
            totals[key][0] += cases
            totals[key][1] += secs
            totals[key][2] += bad
        parts = [f"{k} {v[0]} cases {v[1]:.0f} s {v[2]} failing" for k, v in sorted(totals.items())]
        print(f"by {name}: " + ", ".join(parts))
    print("\ncases by kind/mode/dtype: count, seconds, failing")
    for label in sorted(by_label):
        cases, secs, bad = by_label[label]
        print(f"  {label:36s} {cases:6d} {secs:8.1f} {bad:6d}")
    print("\nkernel launches seen in (cases):")
    for name, count in sorted(kernel_count.items()):
        print(f"  {name:28s} {count}")
    if failure_count:
        print("\nfailures by check:")
        for name, count in failure_count.most_common():
            print(f"  {count:5d}  {name}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
