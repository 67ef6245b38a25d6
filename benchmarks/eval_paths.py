"""An eval call's cost beyond its kernel, by path, with every path in every position.

Claim measured (docs/benchmark_rounds.md, eighth session): at the cache-resident conv
shapes, what separates bnlab's module eval from ``copy_`` is the Python between ``layer(x)`` and
the kernel, and the compiled call (``bn_eval_module``) removes most of it.

Contenders: the module call as shipped (``layer(x)``: the compiled layer call, thirtieth session),
the same call through nn.Module.__call__ (its hooks check, forward and module_forward before the
compiled eval call: the route of the eighth to twenty-ninth sessions), the module call with the
compiled calls switched off (the Python path of earlier releases), the compiled eval call alone,
and the kernel alone writing into a pooled output held across calls. Each sample repeats one call --reps times; each
round runs ``copy_`` (a copy into a buffer allocated once), then every contender preceded by a
sample of the kernel alone, with the contenders' order rotated from round to round: the call that
follows a copy is slower for a whole sample, whichever it is, and a fixed order would credit that
to one path. Prints the median of each, in microseconds, and each path's excess over the kernel.

    PYTHONPATH=src python benchmarks/eval_paths.py [--shape 128,16,32,32 | 8192,100] [--layout cl] [--rounds 24]
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import bnlab
from bnlab import _fastpath
from bnlab.backends import cpu_eval_entry, cpu_pool
from bnlab.backends.cpu import _CODE, CpuBackend, layout_of, threads_for
from bench_cases import bn_layer, make_input, positive_int, shape_parser


PYTHON_PATH = "module call, Python path"
VIA_MODULE_CALL = "via nn.Module.__call__"


def contenders(x) -> tuple[dict, callable]:
    """({name: zero-argument callable}, the kernel alone) for the eval of x (float32)."""
    layers = [bn_layer(bnlab, x.dim(), x.shape[1]).eval() for _ in range(5)]
    entry = cpu_eval_entry()
    lib = CpuBackend().kernels()
    held = cpu_pool.empty_like(x)
    lay, n, c, length = layout_of(x)
    f32, kl = _CODE[torch.float32], layers[3]
    module_call = torch.nn.Module.__call__

    def kernel():
        lib.bn_eval(x.data_ptr(), held.data_ptr(), f32, lay, n, c, length, kl.running_mean.data_ptr(), f32,
                    kl.running_var.data_ptr(), f32, kl.weight.data_ptr(), f32, kl.bias.data_ptr(), f32, kl.eps,
                    threads_for(x))  # fmt: skip

    calls = {
        "module call (compiled layer call)": lambda: layers[0](x),
        PYTHON_PATH: lambda: layers[1](x),  # timed inside _fastpath.python_path_only()
        "bn_eval_module alone": lambda: entry(layers[2], x),
        VIA_MODULE_CALL: lambda: module_call(layers[4], x),
    }
    return calls, kernel


def main(argv=None) -> None:
    p = shape_parser(__doc__, "128,16,32,32", any_rank=True)
    p.add_argument("--layout", default="nchw", choices=["nchw", "cl"])
    p.add_argument("--rounds", type=positive_int, default=24)
    p.add_argument("--reps", type=positive_int, default=60, help="calls per sample")
    args = p.parse_args(argv)
    if args.layout == "cl" and len(args.shape) not in (4, 5):
        p.error(f"--layout cl: channels-last needs a 4D or 5D --shape, got {len(args.shape)}D {args.shape}")
    if cpu_eval_entry() is None:
        raise SystemExit("bnlab's compiled eval call is unavailable (the extension module did not build)")
    torch.set_num_threads(args.threads)
    x = make_input(args.shape, args.layout, torch.float32, "cpu")
    dst = torch.empty_like(x)
    calls, kernel = contenders(x)
    with torch.no_grad():  # inference, as a user's; main() leaves grad mode as it found it
        times = time_paths(args, calls, kernel, dst, x)
    report(args, calls, times)


def time_paths(args, calls: dict, kernel, dst, x) -> dict:
    """{name: [microseconds per call, one per sample]}: the rounds of main's docstring."""
    names = list(calls)
    times = {name: [] for name in [*names, "kernel alone, held output", "copy_ (buffer allocated once)"]}
    for r in range(args.rounds):
        sequence = [("copy_ (buffer allocated once)", lambda: dst.copy_(x))]
        for name in names[r % len(names):] + names[: r % len(names)]:
            sequence += [("kernel alone, held output", kernel), (name, calls[name])]
        for name, fn in sequence:
            # The Python path's switch is set around the sample, outside the timed calls.
            with _fastpath.python_path_only() if name == PYTHON_PATH else contextlib.nullcontext():
                start = time.perf_counter()
                for _ in range(args.reps):
                    fn()
                times[name].append((time.perf_counter() - start) / args.reps * 1e6)
    return times


def report(args, calls: dict, times: dict) -> None:
    """Prints the medians, each path's excess over the kernel and copy_'s ratio to the module calls."""
    names = list(calls)
    skip = len(names)  # the first rotation warms up
    medians = {name: statistics.median(v[skip:] if len(v) > skip else v) for name, v in times.items()}
    base = medians["kernel alone, held output"]
    shape_text = ",".join(map(str, args.shape))
    print(f"# eval_paths.py --shape {shape_text} --layout {args.layout} --threads {args.threads}; "
          f"microseconds, medians of the last {args.rounds - skip} rounds x {args.reps} calls")  # fmt: skip
    for name, value in medians.items():
        extra = f"{value - base:+8.1f}" if name in calls else ""
        print(f"{name:34s} {value:9.1f} {extra}")
    copy = medians["copy_ (buffer allocated once)"]
    print(f"copy_ / module call: compiled layer call {copy / medians[names[0]]:.3f}, via nn.Module.__call__ "
          f"{copy / medians[VIA_MODULE_CALL]:.3f}, Python path {copy / medians[PYTHON_PATH]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
