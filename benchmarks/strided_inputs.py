"""BN of inputs in none of the kernels' layouts: bnlab's kernels on a contiguous copy against the
portable path such views took before, and torch.nn.

Claim measured (docs/benchmark_rounds.md, *twenty-fifth session*): an expanded batch, a strided slice
or a permuted tensor costs bnlab a copy into contiguous memory and then the kernels' time, less
than the portable path's several passes of torch ops, and the kernels' float64 sums replace that
path's float32 ones (cpu.kernel_input).

Each view of VIEWS runs three contenders on the same layer state: ``bnlab`` (as shipped),
``bnlab, portable`` (the same module pinned to the portable backend for the call: what such
views ran before) and ``torch.nn``, timed as bench_bn.py times its own (interleaved samples in
balanced orders, medians), for a training step (forward and torch.autograd.grad of input,
weight and bias) and eval under no_grad. Prints microseconds and the other columns' times over
bnlab's.

    PYTHONPATH=src python benchmarks/strided_inputs.py [--threads 2] [--rounds 9] [--views slice,expand]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import time_interleaved  # noqa: E402
from bench_cases import positive_float, positive_int, refuse_unknown_names  # noqa: E402

import bnlab  # noqa: E402

#: name -> (a zero-argument maker of the view, its description); float32, seeded
VIEWS = {
    "slice": (lambda g: torch.randn(32, 64, 56, 112, generator=g)[..., ::2], "(32, 64, 56, 112)[..., ::2]"),
    "expand": (lambda g: torch.randn(1, 64, 56, 56, generator=g).expand(32, 64, 56, 56),
               "(1, 64, 56, 56).expand(32, 64, 56, 56)"),  # fmt: skip
    "permute": (lambda g: torch.randn(32, 64, 56, 56, generator=g).transpose(2, 3), "(32, 64, 56, 56).transpose(2, 3)"),
    "slice-2d": (lambda g: torch.randn(8192, 200, generator=g)[:, ::2], "(8192, 200)[:, ::2]"),
}
CONTENDERS = ("bnlab", "bnlab, portable", "torch.nn")


def _pinned(fn, name: str):
    """fn with every BN call pinned to the backend ``name`` while it runs."""

    def call():
        bnlab.set_backend(name)
        try:
            fn()
        finally:
            bnlab.set_backend(None)

    return call


def calls(view: torch.Tensor) -> dict[str, dict]:
    """{"step" | "eval": {contender: zero-argument callable}} for one view."""
    channels = view.shape[1]
    bn_class, torch_class = (bnlab.BatchNorm2d, torch.nn.BatchNorm2d) if view.dim() == 4 else (bnlab.BatchNorm1d,
                                                                                              torch.nn.BatchNorm1d)  # fmt: skip
    layers = [bn_class(channels), bn_class(channels), torch_class(channels)]
    dy = torch.randn(view.shape, generator=torch.Generator().manual_seed(1))
    leaf = view.detach().requires_grad_()  # the view itself, its strides kept
    table = {"step": {}, "eval": {}}
    for name, layer in zip(CONTENDERS, layers):

        def step(layer=layer):
            layer.train()
            torch.autograd.grad(layer(leaf), [leaf, layer.weight, layer.bias], dy)

        def evaluate(layer=layer):
            layer.eval()
            with torch.no_grad():
                layer(view)

        for call, fn in (("step", step), ("eval", evaluate)):
            table[call][name] = _pinned(fn, "portable") if name == "bnlab, portable" else fn
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, from {', '.join(VIEWS)}")
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--rounds", type=positive_int, default=9, help="interleaved samples per contender")
    p.add_argument("--min-sample", type=positive_float, default=0.05, help="seconds per sample (default 0.05)")
    args = p.parse_args(argv)
    refuse_unknown_names(p, args, {"views": VIEWS})
    views = args.views.split(",")
    torch.set_num_threads(args.threads)
    print(f"# strided_inputs.py --views {args.views} --threads {args.threads} --rounds {args.rounds}; "
          f"torch {torch.__version__}; microseconds, medians; ratios: the other columns' times over bnlab's")  # fmt: skip
    print(f"{'view':40s} {'call':5s} " + " ".join(f"{c:>16s}" for c in CONTENDERS) + "  portable/bnlab torch/bnlab")
    for name in views:
        make, text = VIEWS[name]
        for call, fns in calls(make(torch.Generator().manual_seed(0))).items():
            seconds = time_interleaved(fns, "cpu", args.rounds, args.min_sample)
            us = [seconds[c] * 1e6 for c in CONTENDERS]
            print(f"{text:40s} {call:5s} " + " ".join(f"{v:16.1f}" for v in us) + f"  {us[1] / us[0]:14.2f} "
                  f"{us[2] / us[0]:11.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
