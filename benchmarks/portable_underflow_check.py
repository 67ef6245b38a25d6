"""What the coefficient-underflow check costs the portable input gradient (elementwise.grad_input).

Claim measured (forty-ninth session, DEVELOPERS.md): an eager CPU call of the portable input
gradient reads its (C,) coefficients k and a on the host (through NumPy) to find channels whose
float32 coefficients fall below the normal range, and does nothing more where none does. Two forms
of the same call on float32 CPU inputs with ordinary values (no channel so): the check left out,
and the check made. Best of --repeats timings of a few calls each (about 2 ms of them), the forms
in turn, --rounds times; microseconds per call and the ratio to the first.

    PYTHONPATH=src:benchmarks python benchmarks/portable_underflow_check.py [--shapes conv-14,mlp-small] [--threads 2]
"""

from __future__ import annotations

import argparse
import timeit
from unittest import mock

import torch

from bnlab import elementwise
from bench_bn import SHAPES
from bench_cases import refuse_unknown_names
from portable_rounded_mean import arguments


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="conv-14,conv-32s,mlp-large,mlp-small",
                   help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3, help="the two forms timed in turn this many times")
    args = p.parse_args(argv)
    refuse_unknown_names(p, args, {"shapes": SHAPES})
    torch.set_num_threads(args.threads)
    forms = {
        "no check": lambda *args: None,
        "checked (eager CPU)": elementwise._coefficients_below_normal,
    }
    print(f"# portable_underflow_check.py --threads {args.threads}; microseconds per call, best of {args.repeats}")
    for shape in [SHAPES[name] for name in args.shapes.split(",")]:
        call_args = arguments(shape)
        number = max(3, int(2e6 / (call_args[0].numel() + 20_000)))
        best = {name: float("inf") for name in forms}
        for _ in range(args.rounds):
            for name, form in forms.items():
                with mock.patch.object(elementwise, "_coefficients_below_normal", form), torch.no_grad():
                    call = lambda: elementwise.grad_input(*call_args)  # noqa: E731
                    t = min(timeit.repeat(call, number=number, repeat=args.repeats))
                best[name] = min(best[name], t / number * 1e6)
        base = best["no check"]
        print(f"{shape}: " + "  ".join(f"{n} {us:.1f} ({us / base:.3f})" for n, us in best.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
