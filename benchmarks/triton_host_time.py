"""The host's share of a GPU BatchNorm call: bnlab's Python around its Triton launches, without a GPU.

Claim measured (docs/benchmarks.md, "GPU kernels"): how many microseconds of Python, torch and
autograd a training forward, a forward+backward step and an eval cost around the kernels, and
how many kernels each launches. On a GPU every tensor of a few MB is done in microseconds, so
this time, not the memory, decides whether bnlab keeps up with torch.nn there.

How: Triton's JITFunction.run is replaced by a counter, so nothing is compiled or launched; the
Triton backend then runs on CPU tensors (TritonBackend(allow_cpu=True)) through the same code as
on CUDA, except that torch allocates on the CPU (cheaper than CUDA's caching allocator) and the
launch itself (Triton's argument binding and the driver call) costs nothing. Medians of 7
samples of 2000 calls; the launches are counted in a separate call. ``--launch direct`` (or
``both``) also takes bnlab's direct-launch path (triton_launch) as on a GPU: the CPU tensors are
taken for GPU ones there, the first launch of each specialization returns a stand-in compiled
kernel whose launcher does nothing, and every later one computes its key and calls that launcher
with Triton's arguments; so the column counts triton_launch's own Python, which the triton column
leaves out.

    python benchmarks/triton_host_time.py [--shapes 256,100 128,16,32,32] [--launch both]

On a GPU (--device cuda) the launches are real and counted by a wrapper: each call's time is then
the host's whole share (small tensors are done on the device long before the host is), set beside
torch.nn's same call, with bnlab's direct launches of compiled kernels (triton_launch) and with
every launch through Triton's JITFunction.run (--launch both, the default); --profile K also
prints where a forward+backward step's host time goes (cProfile of K steps, the functions with
the most time of their own).

    python benchmarks/triton_host_time.py --device cuda --shapes 32,64,56,56 --profile 300

--python-path also times each bnlab call with the compiled calls switched off
(``_fastpath.python_path_only``): the layer call then leaves a GPU call to forward and
``module_forward``'s Python checks, as before the thirty-first session's route
(backends/cpu_kernels_py_device.inc), with direct launches; its column follows the launch count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from triton.runtime.jit import JITFunction

import bnlab
from bnlab import _fastpath
from bnlab.backends import _REGISTRY, PortableBackend, triton_launch
from bnlab.backends.cpu import CpuBackend
from bnlab.backends.triton_backend import TritonBackend
from bench_timing import median_us

_LAUNCHES = [0]


def _count_launch(self, *args, **kwargs):
    _LAUNCHES[0] += 1


class _StandInCompiled:
    """What JITFunction.run returns under ``--launch direct`` without a GPU: a compiled kernel whose
    launcher takes Triton's arguments (grid, stream, function, metadata, hooks, kernel arguments)
    and only counts the launch."""

    function = 0
    packed_metadata = ()

    def run(self, *launch_args):
        _LAUNCHES[0] += 1


_STAND_IN = _StandInCompiled()


def _count_launch_compiled(self, *args, **kwargs):
    _LAUNCHES[0] += 1
    return _STAND_IN


def _stand_in_gpu(direct: bool) -> None:
    """Take the CPU tensors for GPU ones in triton_launch (``direct``), or leave its CPU path (Triton's)."""
    triton_launch.clear()
    triton_launch.ENABLED = direct
    triton_launch._on_gpu = (lambda t: True) if direct else (lambda t: t.is_cuda)
    triton_launch._current_device = lambda: 0
    triton_launch._stream = lambda device: 0


_REAL_LAUNCH = triton_launch.launch


def _count_and_launch(kernel, grid, *args, **kwargs):
    """bnlab's launch (direct or through Triton's JITFunction.run), counted."""
    _LAUNCHES[0] += 1
    return _REAL_LAUNCH(kernel, grid, *args, **kwargs)


def launches(fn) -> int:
    _LAUNCHES[0] = 0
    fn()
    return _LAUNCHES[0]


def _calls(shape: tuple[int, ...], lib, device: str):
    """(layer, {call name: (training mode, zero-argument callable)}) of one layer of ``lib`` (bnlab
    or torch.nn), float32; the caller sets the layer's mode before a call's timing."""
    x, dy = torch.randn(shape, device=device), torch.randn(shape, device=device)
    layer = getattr(lib, "BatchNorm1d" if len(shape) <= 3 else f"BatchNorm{len(shape) - 2}d")(shape[1]).to(device)
    xg = x.clone().requires_grad_()
    params = list(layer.parameters())

    def step():
        return torch.autograd.grad(layer(xg), [xg, *params], dy)

    def evaluate():
        with torch.no_grad():
            return layer(x)

    return layer, {"training forward": (True, lambda: layer(x)), "forward + backward step": (True, step),
                   "eval": (False, evaluate)}  # fmt: skip


def measure(shape: tuple[int, ...], calls: int = 2000, device: str = "cpu", lib=bnlab) -> dict[str, tuple[float, int]]:
    """{call: (microseconds, Triton launches)} for one input shape, float32, contiguous; on CUDA the
    time of ``calls`` back-to-back calls and one synchronisation, per call."""
    layer, named = _calls(shape, lib, device)
    out = {}
    for name, (training, fn) in named.items():
        layer.train(training)
        count = [0]

        def timed(fn=fn, count=count):
            fn()
            count[0] += 1
            if device == "cuda" and count[0] % calls == 0:
                torch.cuda.synchronize()

        out[name] = (median_us(timed, 7, calls), launches(fn))
    return out


def _python_path(shape: tuple[int, ...], calls: int, device: str) -> dict[str, tuple[float, int]]:
    """measure() with the compiled calls off (module_forward's route), launches as the caller set them."""
    with _fastpath.python_path_only():
        return measure(shape, calls, device)


def profile(shape: tuple[int, ...], steps: int, device: str, top: int = 25) -> str:
    """cProfile of ``steps`` forward+backward steps of bnlab's layer: the functions with the most own time."""
    layer, named = _calls(shape, bnlab, device)
    layer.train()
    step = named["forward + backward step"][1]
    for _ in range(20):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["256,100", "128,16,32,32"], help="comma-separated sizes")
    p.add_argument("--calls", type=int, default=2000, help="calls per sample (7 samples)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: launches stubbed; cuda: real")
    p.add_argument("--profile", type=int, default=0, help="also profile this many forward+backward steps")
    p.add_argument("--python-path", action="store_true",
                   help="also time bnlab's calls with the compiled calls off (module_forward's Python checks)")
    p.add_argument("--launch", default="both", choices=["both", "direct", "triton"],
                   help="time bnlab's direct launches of compiled kernels (without a GPU: of a stand-in one), Triton's "
                        "JITFunction.run (without a GPU: stubbed), or both")  # fmt: skip
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls: expected a positive number of calls, got {args.calls}")
    if args.profile < 0:
        p.error(f"--profile: expected a number of steps >= 0 (0: no profile), got {args.profile}")
    shapes = []
    for text in args.shapes:
        try:
            shapes.append(tuple(int(v) for v in text.split(",")))
        except ValueError:
            p.error(f"--shapes: expected comma-separated integers such as 128,16,32,32, got {text!r}")
        if not 2 <= len(shapes[-1]) <= 5 or min(shapes[-1]) < 1:
            p.error(f"--shapes: expected 2 to 5 positive sizes, got {text!r}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
        triton_launch.launch = _count_and_launch
        ways = {"direct": True, "triton": False} if args.launch == "both" else {args.launch: args.launch == "direct"}
        print(f"# triton_host_time.py --device cuda --launch {args.launch} {' '.join(args.shapes)}; "
              f"torch {torch.__version__}, {torch.cuda.get_device_name()}; microseconds per call (median), "
              "Triton launches per call; direct: compiled kernels launched by bnlab (triton_launch), "
              "triton: every launch through JITFunction.run")  # fmt: skip
        for shape in shapes:
            timed = {}
            for way, enabled in ways.items():
                triton_launch.ENABLED = enabled
                timed[way] = measure(shape, args.calls, "cuda")
            theirs = measure(shape, args.calls, "cuda", torch.nn)
            slow = None
            if args.python_path:
                triton_launch.ENABLED = ways.get("direct", False)
                slow = _python_path(shape, args.calls, "cuda")
            for name, (_, n) in timed[next(iter(ways))].items():
                cells = "  ".join(f"{way} {timed[way][name][0]:7.1f} us" for way in ways)
                extra = f"   python path {slow[name][0]:7.1f} us" if slow else ""
                print(f"{str(shape):18s} {name:26s} {cells}  {n} launches   torch.nn {theirs[name][0]:7.1f} us{extra}")
            if args.profile:
                triton_launch.ENABLED = ways.get("direct", False)
                print(profile(shape, args.profile, "cuda"))
        return 0
    JITFunction.run = _count_launch_compiled
    # The CPU backend registered too, after Triton (which then takes these CPU tensors), as in a real
    # session on a GPU, where it is registered first and CUDA tensors pass it by: the layers'
    # compiled layer call is then set up and answers as it would there (forward called directly).
    _REGISTRY[:] = [TritonBackend(allow_cpu=True, self_check=False), CpuBackend(), PortableBackend()]
    torch.set_num_threads(1)
    ways = {"direct": True, "triton": False} if args.launch == "both" else {args.launch: args.launch == "direct"}
    print(f"# triton_host_time.py --launch {args.launch} {' '.join(args.shapes)}; torch {torch.__version__}, "
          "launches stubbed; microseconds per call (median), Triton launches per call; direct: bnlab's direct "
          "launches (triton_launch) of a stand-in compiled kernel, triton: JITFunction.run stubbed")  # fmt: skip
    remembered = 0
    for shape in shapes:
        timed = {}
        for way, direct in ways.items():
            _stand_in_gpu(direct)
            timed[way] = measure(shape, args.calls)
            if direct:
                remembered = len(triton_launch._COMPILED)
        slow = None
        if args.python_path:
            _stand_in_gpu(ways.get("direct", False))
            slow = _python_path(shape, args.calls, "cpu")
        for name, (_, n) in timed[next(iter(ways))].items():
            cells = "  ".join(f"{way} {timed[way][name][0]:7.1f} us" for way in ways)
            extra = f"   python path {slow[name][0]:7.1f} us" if slow else ""
            print(f"{str(shape):18s} {name:26s} {cells}  {n} launches{extra}")
        if args.profile:
            _stand_in_gpu(ways.get("direct", False))
            print(profile(shape, args.profile, "cpu"))
    if "direct" in ways:
        print(f"# direct launches: {remembered} specializations remembered by triton_launch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
