"""A BN call's cost by path, training mode or eval mode with a graph: the compiled whole calls
against the Python path and torch.nn.

Claims measured (docs/benchmarks.md, *A training call in one compiled step*): on small inputs a
training call is bound by its Python, and the compiled calls (``bn_train_module`` for the forward,
``bn_backward_module`` for the backward, backends/cpu_kernels_py_train.inc) remove most of it;
with ``--mode eval`` (frozen statistics while training: eval mode, parameters and input requiring
grad), the compiled eval call making the autograd node and the kernels' backward.

For each shape, three layers with the same state run the same call: bnlab as shipped, bnlab with
the compiled calls switched off (the Python path, switched per call by a dict store), and
torch.nn. On a checkout of an earlier revision (before/after comparisons: run the script with
PYTHONPATH pointing at that checkout's src) the Python-path column is left out. Three calls are timed: the step (forward and torch.autograd.grad of input, weight and
bias), the forward alone (a graph built and dropped), and the forward under no_grad (in training
mode statistics and running averages, in eval mode plain inference). The
contenders of a call are timed as bench_bn.py times its own (bench_bn.time_interleaved:
interleaved samples of about --min-sample seconds, each round in an order of
bench_timing.balanced_orders); the table shows medians in microseconds.

    PYTHONPATH=src python benchmarks/train_paths.py [--mode eval] [--shapes 8,16,4,4 256,100] [--threads 2] [--rounds 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import time_interleaved  # noqa: E402
from bench_cases import positive_int  # noqa: E402

import bnlab  # noqa: E402

try:  # this round's switch; a checkout of an earlier revision has neither it nor the compiled calls
    from bnlab.backends.cpu import COMPILED_CALLS  # noqa: E402
except ImportError:
    COMPILED_CALLS = None

DEFAULT_SHAPES = ("8,16,4,4", "256,100", "128,64,8,8", "64,256,14,14")
LAYERS = {2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d), 4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d)}
PATHS = ("bnlab", "bnlab, Python path", "torch.nn")  # bnlab as shipped: its compiled calls on


def shape_arg(text: str) -> tuple[int, ...]:
    """A shape of 2 (N, C) or 4 (N, C, H, W) positive sizes."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in LAYERS or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C or N,C,H,W of positive sizes, got {text!r}")
    return shape


def seconds_arg(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value}")
    return value


def _python_path(fn):
    """fn with the compiled calls off while it runs (forward and backward)."""

    def call():
        COMPILED_CALLS["on"] = False
        try:
            fn()
        finally:
            COMPILED_CALLS["on"] = True

    return call


def calls(shape, mode: str = "train") -> dict[str, dict]:
    """{call: {path: zero-argument callable}} for one shape (float32, contiguous), the layers in
    training mode or (``mode="eval"``) eval mode."""
    bn_class, torch_class = LAYERS[len(shape)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)
    layers = [bn_class(shape[1]), bn_class(shape[1]), torch_class(shape[1])]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer.train(mode == "train")
    table = {"step": {}, "forward": {}, "forward, no_grad": {}}
    for path, layer in zip(PATHS, layers):
        if path == PATHS[1] and COMPILED_CALLS is None:
            continue
        wanted = (x, layer.weight, layer.bias)

        def step(layer=layer, wanted=wanted):
            torch.autograd.grad(layer(x), wanted, dy)

        def no_grad(layer=layer):
            with torch.no_grad():
                layer(x)

        for call, fn in (("step", step), ("forward", lambda layer=layer: layer(x)), ("forward, no_grad", no_grad)):
            table[call][path] = _python_path(fn) if path == PATHS[1] else fn
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="the layers' mode (default train)")
    p.add_argument("--shapes", nargs="+", type=shape_arg, default=[shape_arg(s) for s in DEFAULT_SHAPES])
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--rounds", type=positive_int, default=16, help="interleaved samples per contender")
    p.add_argument("--min-sample", type=seconds_arg, default=0.02, help="seconds per sample (default 0.02)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes_text = " ".join(",".join(map(str, s)) for s in args.shapes)
    print(f"# train_paths.py --mode {args.mode} --shapes {shapes_text} --threads {args.threads} --rounds {args.rounds}; "
          f"microseconds, medians; the ratios: the other columns' times over bnlab's")  # fmt: skip
    paths = [p for p in PATHS if p != PATHS[1] or COMPILED_CALLS is not None]
    ratios = "  py/bnlab torch/bnlab" if len(paths) == 3 else "  torch/bnlab"
    print(f"{'shape':16s} {'call':17s} " + " ".join(f"{path:>22s}" for path in paths) + ratios)
    for shape in args.shapes:
        for call, fns in calls(shape, args.mode).items():
            seconds = time_interleaved(fns, "cpu", args.rounds, args.min_sample)
            us = [seconds[path] * 1e6 for path in paths]
            ratio_text = "".join(f" {us[i] / us[0]:{w}.2f}" for i, w in ((1, 8), (2, 10))[: len(us) - 1])
            print(f"{str(shape):16s} {call:17s} " + " ".join(f"{v:22.1f}" for v in us) + " " + ratio_text, flush=True)


if __name__ == "__main__":
    main()
