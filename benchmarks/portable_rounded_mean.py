"""What the rounded-mean term costs the portable input gradient (elementwise.grad_input).

Claim measured (docs/math.md §4.2, docs/benchmark_rounds.md, thirty-sixth session): the portable path
computes a·((x - mean_hi) + t), with t = -mean_lo where a is infinite; adding t on every call
(as on a GPU or in a traced graph) costs the input gradient one pass more, while an eager CPU call
checks a's sum on the host and skips the pass when it is finite.

Three forms of the same call on float32 CPU inputs, the sums finite: t skipped without a check
(the form before the term), t skipped after the check (an eager CPU call), t added (the form off
the CPU and in SyncBatchNorm's steps: rounded_mean_term's host_check=False). Best of --repeats
timings of a few calls each (about 2 ms of them), the forms in turn, --rounds times; microseconds
per call and the ratios to the first.

    PYTHONPATH=src python benchmarks/portable_rounded_mean.py [--shapes conv-14,mlp-small] [--threads 2]
"""

from __future__ import annotations

import argparse
import timeit
from unittest import mock

import torch

from bnlab import elementwise
from bench_bn import SHAPES
from bench_cases import refuse_unknown_names


def arguments(shape, seed=0):
    """(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count) with finite sums."""
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    channels = shape[1]
    mean = x.double().mean([d for d in range(x.dim()) if d != 1])
    vectors = [torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5, torch.rand(channels, generator=gen)]
    sums = [torch.randn(channels, generator=gen, dtype=torch.float64) for _ in range(2)]
    return (dy, x, mean, *vectors, *sums, x.numel() // channels)


def forms_arguments(argv, doc: str) -> argparse.Namespace:
    """The options of a script that times forms of the portable input gradient (this one,
    portable_underflow_check.py), parsed; torch's threads set."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shapes", default="conv-14,conv-32s,mlp-large,mlp-small",
                   help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3, help="the forms timed in turn this many times")
    args = p.parse_args(argv)
    refuse_unknown_names(p, args, {"shapes": SHAPES})
    torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> int:
    args = forms_arguments(argv, __doc__)
    real = elementwise.rounded_mean_term
    forms = {
        "no term": lambda a, lo, dtype, host_check=True: None,
        "checked (eager CPU)": real,
        "always added": lambda a, lo, dtype, host_check=True: real(a, lo, dtype, host_check=False),
    }
    print(f"# portable_rounded_mean.py --threads {args.threads}; microseconds per call, best of {args.repeats}")
    print_forms("rounded_mean_term", forms, args)
    return 0


def print_forms(replaced: str, forms: dict, args: argparse.Namespace) -> None:
    """For each of ``args.shapes``: elementwise.grad_input timed with elementwise's function
    ``replaced`` standing in each of ``forms`` (name: function), best of ``args.repeats`` timings of
    a few calls, the forms in turn ``args.rounds`` times; one line of microseconds per call and
    their ratios to the first form."""
    for shape in [SHAPES[name] for name in args.shapes.split(",")]:
        call_args = arguments(shape)
        number = max(3, int(2e6 / (call_args[0].numel() + 20_000)))
        best = {name: float("inf") for name in forms}
        for _ in range(args.rounds):
            for name, form in forms.items():
                with mock.patch.object(elementwise, replaced, form), torch.no_grad():
                    call = lambda: elementwise.grad_input(*call_args)  # noqa: E731
                    t = min(timeit.repeat(call, number=number, repeat=args.repeats))
                best[name] = min(best[name], t / number * 1e6)
        base = next(iter(best.values()))
        print(f"{shape}: " + "  ".join(f"{n} {us:.1f} ({us / base:.3f})" for n, us in best.items()), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
