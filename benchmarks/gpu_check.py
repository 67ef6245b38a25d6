"""Check bnlab's Triton kernels on a real GPU against float64 and torch.nn (cuDNN), before timing them.

CI has no GPU: there the kernels run in Triton's interpreter (tests/test_triton.py) and are
compiled for sm_90 without running (tests/test_triton_compile.py). This script is the check on
the device itself, at sizes the interpreter cannot reach (tens of millions of elements, few
channels with long rows, many segments per channel):

- the backend's forward and backward against bnlab.reference (the float64 NumPy reference, on
  host copies), by max |error| / max |reference|;
- module training steps (output, input and parameter gradients, running averages, the batch
  counter) and eval against torch.nn.BatchNorm2d/1d on the same GPU;
- the fused BatchNormAct2d (ReLU, residual + ReLU) against torch's unfused sequence;
- data at 1e3 ± 0.01 (the variance must survive);
- a negative running variance in eval stops the device (a child process per eval kernel: two
  good calls on the stream, then the bad one, whose device-side assertion ends the context).

Every output buffer is preceded by a poisoning of PyTorch's caching allocator with NaN, so an
element a kernel forgets to write shows up as NaN. Fresh random inputs for every check. A Triton
first-use failure is an error here, not a fall-back: the script fails if any call runs elsewhere.

    PYTHONPATH=src python benchmarks/gpu_check.py            # prints one line per check, FAIL lines last
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gpu_check.py --dry-run   # the script itself, on CPU

--dry-run runs the same checks through Triton's interpreter on CPU tensors at small shapes: it
checks this script (its oracle, its bookkeeping), not the GPU.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn

import bnlab
from bnlab import reference
from bnlab.backends import _REGISTRY, PortableBackend, select_backend

TOL = {getattr(torch, name): tol for name, tol in reference.TOLERANCE.items() if name != "float64"}
SHAPES = [  # (shape, channels_last)
    ((32, 64, 56, 56), False), ((32, 64, 56, 56), True), ((128, 16, 32, 32), True), ((256, 64, 32, 32), False),
    ((8192, 100), False), ((256, 100), False), ((7, 3, 5, 9), False), ((7, 3, 5, 9), True),
    ((4, 2, 300000), False), ((3, 5, 2, 3, 7), True), ((65536, 3), False), ((64, 2048), False),
    ((40, 1000), False),  # the one-program kernels (triton_small) at their widest: 1000 channels, 1024 lanes
    # NCHW rows of 9 and 4 values: eval's two-kernel path (eval_one_launch is False); at 2x2 also the
    # backward's merge kernel (merge_in_tiles is False), which (4, 2, 300000) takes for its many segments
    ((64, 32, 3, 3), False), ((4096, 8, 2, 2), False),
]  # fmt: skip
#: --quick: one shape of each way the statistics kernels see an input (NCL rows, NLC rows of a few
#: and of many channels, few channels with long rows, odd tails), for a short lease after a change
QUICK_SHAPES = [((32, 64, 56, 56), False), ((32, 64, 56, 56), True), ((8192, 100), False), ((4, 2, 300000), False),
                ((128, 16, 32, 32), True), ((7, 3, 5, 9), False)]  # fmt: skip
DRY_RUN_SHAPES = [((4, 6, 5, 7), False), ((4, 6, 5, 7), True), ((33, 5), False), ((3, 2, 301), False),
                  ((3, 5, 2, 3, 2), True)]  # fmt: skip
DEVICE = "cuda"
FUSED_SHAPE, STABILITY_SHAPE = (16, 64, 28, 28), (64, 8, 32, 32)
failures: list[str] = []


def poison() -> None:
    """Fill the caching allocator's free blocks with NaN: an unwritten output element stays NaN."""
    if DEVICE != "cuda":
        return  # the CPU allocator hands back fresh pages: nothing to poison
    free = torch.cuda.mem_get_info()[0]
    big = torch.full((min(free // 2, 4 << 30) // 4,), float("nan"), device=DEVICE)
    del big


def rand(shape, dtype, cl, mean=0.0, std=1.0) -> torch.Tensor:
    x = (torch.randn(shape, device=DEVICE, dtype=torch.float64) * std + mean).to(dtype)
    if cl:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = rel_err(got, want)
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        failures.append(f"{name}: {err:.3g} > {tol:.0e}")


def oracle(x, dy, w, b, eps):
    """bnlab.reference (the float64 NumPy reference) on host copies: y, dx, dw, db, mean, var."""
    host = [None if t is None else t.detach().double().cpu().numpy() for t in (x, dy, w, b)]
    y, cache = reference.forward_train(host[0], host[2], host[3], eps)
    dx, dw, db = reference.backward(host[1], cache)
    return (*(torch.from_numpy(v) for v in (y, dx, dw, db)), torch.from_numpy(cache.mean).flatten(),
            torch.from_numpy(cache.var).flatten())  # fmt: skip


def check_backend(shape, cl, dtype) -> None:
    tag = f"{tuple(shape)} {'cl' if cl else 'nchw'} {str(dtype)[6:]}"
    x, dy = rand(shape, dtype, cl, 0.5, 2.0), rand(shape, dtype, cl)
    c = shape[1]
    w, b = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    backend = select_backend(x)
    if backend.name != "triton":
        failures.append(f"{tag}: ran on the {backend.name!r} backend, not triton")
        return
    poison()
    y, stats, invstd = backend.forward_train(x, w, b, 1e-5)
    poison()
    dx, dw, db = backend.backward(dy, x, stats.mean, invstd, w, stats.count, True)
    # The same calls again: on a GPU their launches now go straight to the compiled kernels
    # (triton_launch), which must give the very same bits as Triton's own launch path did.
    poison()
    y_again, _, _ = backend.forward_train(x, w, b, 1e-5)
    dx_again = backend.backward(dy, x, stats.mean, invstd, w, stats.count, True)[0]
    if not (torch.equal(y_again, y) and torch.equal(dx_again, dx)):
        failures.append(f"{tag}: a repeated call (direct launches) differs from the first")
    ry, rdx, rdw, rdb, rmean, rvar = oracle(x, dy, w, b, 1e-5)
    tol = TOL[dtype]
    check(f"backend y {tag}", y, ry, tol)
    check(f"backend dx {tag}", dx, rdx, tol)
    check(f"backend mean {tag}", stats.mean, rmean, 1e-9)
    check(f"backend var {tag}", stats.m2 / stats.count, rvar, 1e-9)
    check(f"backend dweight {tag}", dw, rdw, 1e-5)
    check(f"backend dbias {tag}", db, rdb, 1e-5)
    if y.stride() != x.stride() or dx.stride() != x.stride():
        failures.append(f"{tag}: output strides {y.stride()}/{dx.stride()} differ from the input's {x.stride()}")


def check_module(shape, cl, dtype) -> None:
    tag = f"{tuple(shape)} {'cl' if cl else 'nchw'} {str(dtype)[6:]}"
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    ours = getattr(bnlab, name)(shape[1]).to(DEVICE, dtype)
    theirs = getattr(nn, name)(shape[1]).to(DEVICE, dtype)
    tol = TOL[dtype]
    for step in range(2):
        x, dy = rand(shape, dtype, cl, float(step), 1.5), rand(shape, dtype, cl)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        poison()
        y1 = ours(x1)
        y1.backward(dy)
        y2 = theirs(x2)
        y2.backward(dy)
        check(f"module y step {step} {tag}", y1, y2, tol)
        check(f"module dx step {step} {tag}", x1.grad, x2.grad, tol)
        check(f"module dweight step {step} {tag}", ours.weight.grad, theirs.weight.grad, tol)
        check(f"module running_var step {step} {tag}", ours.running_var, theirs.running_var, tol)
        ours.weight.grad = theirs.weight.grad = ours.bias.grad = theirs.bias.grad = None
    if int(ours.num_batches_tracked) != 2:
        failures.append(f"module {tag}: num_batches_tracked {int(ours.num_batches_tracked)} != 2")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        x = rand(shape, dtype, cl, 1.0)
        poison()
        check(f"module eval {tag}", ours(x), theirs(x), tol)


def check_fused(cl, dtype, residual) -> None:
    shape = FUSED_SHAPE
    tag = f"{shape} {'cl' if cl else 'nchw'} {str(dtype)[6:]} residual={residual}"
    ours = bnlab.BatchNormAct2d(shape[1], residual=residual).to(DEVICE).to(dtype)
    # The reference runs in float32 on the same inputs: torch's bfloat16 sequence rounds BN(x) before
    # the add, which moves the ReLU's zero crossing and with it whole gradient elements.
    theirs = nn.BatchNorm2d(shape[1]).to(DEVICE)
    x, dy = rand(shape, dtype, cl), rand(shape, dtype, cl)
    res = rand(shape, dtype, cl) if residual else None
    x1, x2 = x.clone().requires_grad_(), x.float().requires_grad_()
    r1, r2 = (res.clone().requires_grad_(), res.float().requires_grad_()) if residual else (None, None)
    poison()
    y1 = ours(x1, r1) if residual else ours(x1)
    y2 = torch.relu(theirs(x2) + (r2 if residual else 0))
    y1.backward(dy)
    y2.backward(dy.float())
    tol = TOL[dtype]
    check(f"fused y {tag}", y1, y2, tol)
    check(f"fused dx {tag}", x1.grad, x2.grad, tol)
    check(f"fused dweight {tag}", ours.weight.grad, theirs.weight.grad, tol)
    if residual:
        check(f"fused dresidual {tag}", r1.grad, r2.grad, tol)


def check_stability() -> None:
    x = rand(STABILITY_SHAPE, torch.float32, False, 1000.0, 0.01)
    y, stats, _ = select_backend(x).forward_train(x, None, None, 1e-5)
    ry = oracle(x, x, None, None, 1e-5)[0]
    check("stability y at 1e3 ± 0.01", y, ry, 2e-4)


#: The child of check_negative_variance: eval calls on one stream, good ones around a bad one, for
#: the three eval kernels (one program; eval_kernel; eval_coef_kernel + normalize). It prints
#: "good <max error>" per good call and, for the bad one, the error raised (at once in the
#: interpreter; on CUDA at the synchronisation, as a device-side assertion ends the context).
_NEGATIVE_VARIANCE_CHILD = """
import sys, torch, bnlab
from bnlab.backends import _REGISTRY, PortableBackend
device, shape, cl = sys.argv[1], eval(sys.argv[2]), sys.argv[3] == "1"
if device == "cpu":
    from bnlab.backends.triton_backend import TritonBackend
    _REGISTRY[:] = [TritonBackend(allow_cpu=True), PortableBackend()]
x = torch.randn(shape, device=device)
x = x.contiguous(memory_format=torch.channels_last) if cl else x
c = shape[1]
layer = (bnlab.BatchNorm2d if len(shape) == 4 else bnlab.BatchNorm1d)(c).to(device).eval()
with torch.no_grad():
    layer.running_var.uniform_(0.5, 2.0)
    for good in range(2):
        want = (x.double() - layer.running_mean.double().reshape(1, -1, *[1] * (x.dim() - 2))) / torch.sqrt(
            layer.running_var.double().reshape(1, -1, *[1] * (x.dim() - 2)) + layer.eps)
        got = layer(x)
        print("good", float((got.double() - want).abs().max()), flush=True)
    layer.running_var[c // 2] = -0.5
    try:
        layer(x)
        if device == "cuda":
            torch.cuda.synchronize()
        print("bad: no error")
    except Exception as exc:
        print("bad:", type(exc).__name__, str(exc).splitlines()[0][:200])
"""


def check_negative_variance() -> None:
    """A negative running variance stops eval on the device (triton_backend._checked, with the flag
    kept per stream, triton_ops.variance_flag): in a child process, whose CUDA context the
    device-side assertion ends; two good calls first on the same stream must pass."""
    import subprocess

    # on the GPU: the one-program kernel, eval_kernel and coef + normalize (the plans of GPU tiles);
    # in the dry run, small shapes (the interpreter's tiles choose their own kernels)
    big, small = ((64, 100), (32, 64, 28, 28), (32, 64, 28, 28)), ((33, 5), (4, 6, 5, 7), (4, 6, 5, 7))
    shapes = big if DEVICE == "cuda" else small
    for shape, cl in zip(shapes, (False, False, True)):
        done = subprocess.run([sys.executable, "-c", _NEGATIVE_VARIANCE_CHILD, DEVICE, repr(shape), str(int(cl))],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        lines = done.stdout.splitlines()
        name = f"negative running variance {shape}{' channels-last' if cl else ''}"
        goods = [float(line.split()[1]) for line in lines if line.startswith("good ")]
        bad = next((line for line in lines if line.startswith("bad")), "bad: the child died: " + done.stderr[-300:])
        # CUDA: "device-side assert triggered"; the interpreter: bnlab's ValueError naming the channel
        expected = "assert" if DEVICE == "cuda" else f"channels [{shape[1] // 2}]"
        ok = len(goods) == 2 and max(goods) <= 1e-5 and expected in bad
        print(f"{'ok  ' if ok else 'FAIL'} {name}: good calls {goods}; {bad}", flush=True)
        if not ok:
            failures.append(f"{name}: good calls {goods}; {bad}")


def dry_run_on_cpu() -> list:
    """Route CPU tensors to the interpreted Triton backend; the small shapes to check."""
    global DEVICE, FUSED_SHAPE, STABILITY_SHAPE
    from bnlab.backends.triton_backend import TritonBackend  # needs TRITON_INTERPRET=1, set by the caller

    DEVICE, FUSED_SHAPE, STABILITY_SHAPE = "cpu", (4, 6, 5, 7), (16, 3, 9, 9)
    _REGISTRY[:] = [TritonBackend(allow_cpu=True), PortableBackend()]
    return DRY_RUN_SHAPES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run the checks in the interpreter on CPU")
    parser.add_argument("--quick", action="store_true", help=f"only the shapes {[s for s, _ in QUICK_SHAPES]}")
    args = parser.parse_args()
    if args.dry_run:
        shapes, where = dry_run_on_cpu(), "CPU (Triton interpreter)"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (--dry-run checks the script on CPU)")
    else:
        shapes, where = QUICK_SHAPES if args.quick else SHAPES, torch.cuda.get_device_name()
    warnings.simplefilter("error", RuntimeWarning)  # a Triton first-use failure must not pass as a fall-back
    torch.manual_seed(0)
    print(f"{where}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    for shape, cl in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_backend(shape, cl, dtype)
        check_module(shape, cl, torch.float32)
    check_module(shapes[0][0], True, torch.bfloat16)
    for cl in (False, True):
        for residual in (False, True):
            check_fused(cl, torch.float32, residual)
    check_fused(True, torch.bfloat16, True)
    check_stability()
    check_negative_variance()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        from bnlab.backends import triton_launch

        remembered = len(triton_launch._COMPILED)
        print(f"direct launches: {'on' if triton_launch.ENABLED else 'off'}, {remembered} compiled kernels remembered")
        if triton_launch.ENABLED and remembered == 0:
            failures.append("direct launches: no compiled kernel was remembered, so none was checked")
    print(f"\n{len(failures)} failure(s)" + "".join(f"\nFAIL {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
