"""The layer call's two cheaper ways, each on and off, in one process.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-07, fifty-second session*): the
compiled whole calls take less time per layer call when they read the layer's attributes through
a record per type (cpu_kernels_py_attrs.inc) rather than with PyObject_GetAttr, and, in the torch
build, when they make their new tensors without the dispatcher (cpu_kernels_torch.h). The
extension module's ``bn_ab_switches(attrs_kept, direct_outputs)`` turns each off and on; all four
settings run on the same layer and input, in an order that alternates between rounds, beside
``copy_`` into a buffer allocated once. Prints each one's median in microseconds per call and the
differences, round by round, of each way off against both on (median and quartiles).

    PYTHONPATH=src:benchmarks python benchmarks/layer_call_ab.py [--shape 256,100] [--mode eval|train]
"""

from __future__ import annotations

import statistics

import torch

import bnlab
from bnlab.backends import registered_cpu_backend
from bnlab.lab.tables import counted
from bench_cases import positive_int, shape_parser
from bench_timing import sample_seconds

#: setting name -> (attrs_kept, direct_outputs)
SETTINGS = {
    "both on": (True, True),
    "attributes by PyObject_GetAttr": (False, True),
    "outputs through the dispatcher": (True, False),
    "both off": (False, False),
}


def main() -> None:
    p = shape_parser(__doc__, "256,100", any_rank=True)
    p.add_argument("--mode", choices=("eval", "train"), default="eval", help="the layer's mode (default eval)")
    p.add_argument("--rounds", type=positive_int, default=21, help="rounds of every setting (default 21)")
    p.add_argument("--calls", type=positive_int, default=20000, help="calls timed together (default 20000)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # the layer's forward alone, as in inference or a frozen step
    x = torch.randn(args.shape)
    layer = (bnlab.BatchNorm1d if len(args.shape) <= 3 else bnlab.BatchNorm2d)(args.shape[1])
    layer.train(args.mode == "train")
    out = torch.empty_like(x)
    layer(x)  # loads the kernels and sets up the compiled calls
    backend = registered_cpu_backend()
    switches = getattr(backend.kernels() if backend is not None else None, "bn_ab_switches", None)
    if switches is None:
        raise SystemExit("layer_call_ab.py: needs the compiled extension module (bnlab.backends.cpu_build)")
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    times["copy_"] = []
    try:
        for r in range(args.rounds):
            for name in list(SETTINGS)[:: 1 if r % 2 else -1]:
                switches(*SETTINGS[name])
                layer(x)
                times[name].append(sample_seconds(lambda: layer(x), args.calls) * 1e6)
            times["copy_"].append(sample_seconds(lambda: out.copy_(x), args.calls) * 1e6)
    finally:
        switches(True, True)
    print(f"layer{tuple(args.shape)} {args.mode}, {counted(args.threads, 'thread')}, "
          f"{args.rounds} rounds of {args.calls} calls;"
          f" torch {torch.__version__}")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:32s} {statistics.median(values):7.3f} us")
    for name in list(SETTINGS)[1:]:
        diffs = [a - b for a, b in zip(times[name], times["both on"])]
        q = statistics.quantiles(diffs, n=4)
        print(f"  {name} - both on: {statistics.median(diffs):+.3f} us (quartiles {q[0]:+.3f} .. {q[2]:+.3f})")


if __name__ == "__main__":
    main()
