"""Compile every Triton kernel variant bnlab launches, for a GPU target, on a machine without a GPU.

Run as a script (by tests/test_triton_compile.py) with TRITON_INTERPRET unset: the interpreter
runs kernels as Python and accepts code that Triton's compiler rejects (it once accepted a helper
whose two constexpr branches returned tiles of different shapes). Here the launchers in
bnlab.backends.triton_ops run on CPU tensors with GPU-sized plans, every launch is intercepted
instead of executed, and its kernel is compiled by ``triton.compile`` (Triton's own ptxas) for
the target given by --arch (default sm_90, the H100/H200). Nothing runs on a device.

Prints one line per distinct kernel variant compiled, then ``compiled N variants``; exits 1 with
the compiler's message on the first failure. ``--part K/N`` compiles only every N-th distinct
variant from the K-th on (in the order the launchers reach them, the same in every process), so
that N processes share the compiling (test_triton_compile.py runs two, one per core). With
--resources, also each variant's registers per thread and spill bytes (from the log of the
``ptxas -v`` run that makes its cubin: compile_variant), a register range per kernel and
``spill bytes N``: a spill makes a memory-bound kernel wait on local memory, and registers bound
how many warps an SM holds.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_worker: run with TRITON_INTERPRET unset (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from bnlab.backends import triton_ops, triton_plan  # noqa: E402
from speed_helpers import to_layout  # noqa: E402  (tests/ is on the path: the caller's PYTHONPATH)

# Launch keywords that are compile options rather than kernel arguments.
COMPILE_OPTIONS = ("enable_fp_fusion", "num_warps", "num_stages")
def ptxas_resources(log: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) from a ``ptxas -v`` log."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, spills


def separate_ptxas_log(ptx: str, arch: int) -> str:
    """The log of ``ptxas -v`` run again on a kernel's PTX, with the ptxas Triton uses for this
    architecture but not Triton's other flags: for a Triton whose compile cannot print its log."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)  # e.g. sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, f"-arch={target}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def compile_variant(source: ASTSource, target: GPUTarget, options: dict, resources: bool):
    """triton.compile(source), and with ``resources`` the log of the ptxas run that made its cubin:
    Triton runs ptxas with -v and prints that log when asked (knobs.nvidia.dump_ptxas_log), so the
    resources are those of the very compile (its flags: Triton 3.9 adds --regAllocOptLevel=2, under
    which one variant spilled that a plain ``ptxas -v`` run did not). A Triton without that knob
    (or whose log is not printed) gets a separate ptxas run."""
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if not resources or not hasattr(knobs, "dump_ptxas_log"):
        compiled = triton.compile(source, target=target, options=options)
        return compiled, separate_ptxas_log(compiled.asm["ptx"], target.arch) if resources else ""
    log = io.StringIO()
    previous = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options)
    finally:
        knobs.dump_ptxas_log = previous
    if "Used " not in log.getvalue():  # the compile came from a cache, or printed no log
        return compiled, separate_ptxas_log(compiled.asm["ptx"], target.arch)
    return compiled, log.getvalue()


def _check_float_arguments(kernel: JITFunction, args, kwargs) -> None:
    """Exit if a Python float reaches a kernel parameter without a type: Triton's launcher types it
    fp32 on a GPU, where the interpreter (the tests) computes with its float64 value, so eps = 1e-5
    or a count past 2**24 would give other results there. Such a parameter is annotated instead
    (``eps: tl.float64``)."""
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in COMPILE_OPTIONS})
    for param in kernel.params:
        value = bound.arguments.get(param.name)
        if isinstance(value, float) and not param.is_constexpr and not param.annotation_type:
            sys.exit(f"FAILED {kernel.fn.__name__}: float argument {param.name}={value!r} reaches a parameter without "
                     f"a type, which Triton makes fp32 on a GPU; annotate it ({param.name}: tl.float64)")


class Recorder:
    """Stands in for JITFunction.run: compiles each distinct (kernel, signature, constexprs) once;
    with ``resources``, also records each variant's registers and spills."""

    def __init__(self, target: GPUTarget, resources: bool = False, part: tuple[int, int] = (0, 1)):
        self.target = target
        self.seen: set = set()
        self.compiled = 0
        self.part = part  # (K, N): compile the distinct variants whose ordinal is K modulo N
        self.resources: dict[str, list[tuple[int, int]]] | None = {} if resources else None
        self.backend = make_backend(target)
        self.binders: dict = {}

    def specialize(self, kernel: JITFunction, args, kwargs) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) of this launch as Triton's own launcher makes them for the
        target: its types (annotations first, a Python float as fp32), the integers equal to 1 made
        constants, and the pointers and integers divisible by 16 marked so (tt.divisibility), which
        the compiler uses to vectorise loads: the variant a GPU would compile for these arguments."""
        binder = self.binders.get(kernel)
        if binder is None:
            binder = self.binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        _options, signature, constexprs, attrs = kernel._pack_args(self.backend, options, bound_args, specialization,
                                                                   options)  # fmt: skip
        return signature, constexprs, attrs

    def __call__(self, kernel: JITFunction, *args, grid, warmup, **kwargs):
        options = {name: kwargs[name] for name in kwargs if name in COMPILE_OPTIONS}
        if options.get("enable_fp_fusion") is not True:
            # Every launch pins FMA fusion (triton_ops._COMPILE): Triton's default changes in 3.10.
            sys.exit(f"FAILED {kernel.fn.__name__}: launched without enable_fp_fusion=True, got options {options}")
        _check_float_arguments(kernel, args, kwargs)
        signature, constexprs, attrs = self.specialize(kernel, args, kwargs)
        key = (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), repr(sorted(attrs.items())))
        if key in self.seen:
            return None
        self.seen.add(key)
        if (len(self.seen) - 1) % self.part[1] != self.part[0]:
            return None  # another part's
        self.compiled += 1
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled, log = compile_variant(source, self.target, options, self.resources is not None)
        except Exception as exc:
            cause = exc.__cause__ or exc
            sys.exit(f"FAILED {kernel.fn.__name__} {constexprs} {signature}:\n{exc}\ncause: {cause!r}")
        # FMA instructions in the PTX: what enable_fp_fusion decides (unfused, a multiply and an add)
        extra = f" fma {compiled.asm['ptx'].count('fma.rn.f32')} fma64 {compiled.asm['ptx'].count('fma.rn.f64')}"
        if self.resources is not None:
            registers, spills = ptxas_resources(log)
            self.resources.setdefault(kernel.fn.__name__, []).append((registers, spills))
            extra += f" registers {registers} spills {spills}"
        names = [p.name for p in kernel.params]
        print(f"ok {kernel.fn.__name__} { {names[path[0]]: v for path, v in constexprs.items()} }{extra}", flush=True)
        return None


def drive_every_launch() -> None:
    """Call each launcher in each configuration the backend and the fused layer use."""
    ops = triton_ops
    shapes = [((4, 64, 56, 56), False), ((5, 3, 7), False), ((4, 64, 5, 5), True), ((37, 5), False), ((9, 3, 2, 2), True)]
    for (shape, cl), dtype in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.float16)):
        x = to_layout(torch.empty(shape, dtype=dtype), "cl" if cl else "nchw")
        c = shape[1]
        p = ops.plan(x, for_gpu=True)
        w, b = torch.empty(c), torch.empty(c)
        rm, rv, counter = torch.empty(c), torch.empty(c), torch.zeros((), dtype=torch.int64)
        mean64, invstd64 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        for affine in (True, False):
            wa, ba = (w, b) if affine else (None, None)
            ops.forward_train(x, wa, ba, 1e-5, p=p)
            ops.forward_train(x, wa, ba, 1e-5, rm, rv, 0.1, counter, guard=True, p=p)
            ops.forward_train(x, wa, ba, 1e-5, rm, rv, None, counter, guard=False, p=p)
            ops.normalize_with(x, mean64, invstd64, wa, ba, p=p)
            ops.normalize_with(x, rm, rv, wa, ba, 1e-5, given_invstd=False, p=p)
            stats, hi = torch.empty(3, c, dtype=torch.float64), torch.empty(c)
            for centred in (True, False):  # the training backward; SyncBatchNorm's global mean
                ops.backward(x, x, stats, hi, wa, p=p, centred=centred)
                ops.backward(x, x, stats, hi, wa, need_dx=False, p=p, centred=centred)
            ops.grad_input_with(x, x, mean64, invstd64, wa, mean64, mean64, 10.0, p=p)
        ops.forward_train(x, None, None, 1.0, want_y=False, p=p)  # moments
        for residual in (None, x):  # the fused layer: BN (+ residual) + ReLU with its 1-bit mask
            y, stats, coef, mask = ops.forward_train(x, w, b, 1e-5, rm, rv, 0.1, counter, True, residual=residual,
                                                     relu=True, want_mask=True, p=p)  # fmt: skip
            mask = torch.empty(p.rows * p.k8b, dtype=torch.uint8)
            for need_dx, want_dres in ((True, residual is not None), (False, True)):
                ops.backward(x, x, stats, coef[0], w, need_dx, mask=mask, want_dres=want_dres, dweight=torch.empty(c),
                             dbias=torch.empty(c), p=p, centred=True)  # fmt: skip
            ops.normalize_with(x, rm, rv, w, b, 1e-5, given_invstd=False, residual=residual, relu=True, p=p)
        if dtype != torch.float32:  # model.to(dtype): parameters and running averages in 16 bits too
            w16, b16, rm16, rv16 = (torch.empty(c, dtype=dtype) for _ in range(4))
            y, stats, coef, _ = ops.forward_train(x, w16, b16, 1e-5, rm16, rv16, 0.1, counter, True, p=p)
            ops.backward(x, x, stats, coef[0], w16, True, dweight=torch.empty_like(w16), dbias=torch.empty_like(b16), p=p,
                         centred=True)
            ops.normalize_with(x, rm16, rv16, w16, b16, 1e-5, given_invstd=False, p=p)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--resources", action="store_true", help="also report registers and spills (ptxas -v)")
    parser.add_argument("--tiles", default=None, help="plan under these triton_plan.Tiles (as bench_bn.py --triton-tiles)")
    parser.add_argument("--part", default="0/1", help="K/N: compile every N-th distinct variant from the K-th on")
    parser.add_argument("--row-fit", action="store_true", help="plan NCL rows in fitted tiles (triton_plan.ROW_FIT)")
    args = parser.parse_args()
    triton_plan.ROW_FIT = args.row_fit
    try:
        part = tuple(int(v) for v in args.part.split("/"))
        if len(part) != 2 or not 0 <= part[0] < part[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--part: expected K/N with 0 <= K < N, got {args.part!r}")
    if args.tiles is not None:
        try:
            triton_plan.GPU_TILES = triton_plan.parse_tiles(args.tiles)
        except ValueError as exc:
            parser.error(f"--tiles: {exc}")
    recorder = Recorder(GPUTarget("cuda", args.arch, 32), resources=args.resources, part=part)
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **kw: recorder(self, *a, **kw)
    try:
        drive_every_launch()  # small rows of channels take the one-program kernels (triton_small) ...
        small_numel, triton_ops.SMALL_NUMEL = triton_ops.SMALL_NUMEL, 0
        drive_every_launch()  # ... and here the general ones
        triton_ops.SMALL_NUMEL = small_numel
    finally:
        JITFunction.run = original
    if recorder.resources is not None:
        for name, rows in sorted(recorder.resources.items()):
            registers = [r for r, _ in rows]
            print(f"resources {name}: {len(rows)} variants, registers {min(registers)}-{max(registers)}")
        print(f"spill bytes {sum(s for rows in recorder.resources.values() for _, s in rows)}")
    print(f"compiled {recorder.compiled} variants for sm_{args.arch} (part {args.part} of {len(recorder.seen)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
