"""A BN call's cost by path, training mode or eval mode with a graph: the compiled whole calls
against the Python path and torch.nn.

Claims measured (docs/benchmark_rounds.md, eleventh session): on small inputs a
training call is bound by its Python, and the compiled calls (``bn_train_module`` for the forward,
``bn_backward_module`` for the backward, backends/cpu_kernels_py_train.inc) remove most of it;
with ``--mode eval`` (frozen statistics while training: eval mode, parameters and input requiring
grad), the compiled eval call making the autograd node and the kernels' backward.

For each shape, four layers with the same state run the same call: bnlab as shipped (``layer(x)``,
since the thirtieth session the compiled layer call), bnlab called through nn.Module.__call__ (the
route before: hooks check, forward, module_forward, then the compiled calls), bnlab with the
compiled calls switched off (the Python path, switched per call by a dict store), and torch.nn.
On a checkout of an earlier revision (before/after comparisons: run the script with PYTHONPATH
pointing at that checkout's src) the columns it lacks are left out. Three calls are timed: the step (forward and torch.autograd.grad of input, weight and
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
try:  # the thirtieth session's layer call; without it layer(x) is nn.Module.__call__ already
    from bnlab._fastpath import LAYER_CALL  # noqa: E402
except ImportError:
    LAYER_CALL = None

LAYERS = {2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d), 4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d)}
# bnlab as shipped first (its compiled calls on); the ratios are the other paths' times over its.
PATHS = ("bnlab", "bnlab via Module.__call__", "bnlab, Python path", "torch.nn")


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
    layers = [bn_class(shape[1]), bn_class(shape[1]), bn_class(shape[1]), torch_class(shape[1])]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer.train(mode == "train")
    table = {"step": {}, "forward": {}, "forward, no_grad": {}}
    module_call = torch.nn.Module.__call__
    for path, layer in zip(PATHS, layers):
        if path not in available_paths():
            continue
        wanted = (x, layer.weight, layer.bias)
        run = (lambda layer: module_call(layer, x)) if path == PATHS[1] else (lambda layer: layer(x))

        def step(layer=layer, wanted=wanted, run=run):
            torch.autograd.grad(run(layer), wanted, dy)

        def no_grad(layer=layer, run=run):
            with torch.no_grad():
                run(layer)

        def forward(layer=layer, run=run):
            run(layer)

        for call, fn in (("step", step), ("forward", forward), ("forward, no_grad", no_grad)):
            table[call][path] = _python_path(fn) if path == PATHS[2] else fn
    return table


def available_paths() -> list[str]:
    """PATHS, less those the bnlab imported lacks (an earlier revision's)."""
    lacking = {PATHS[1]: LAYER_CALL is None, PATHS[2]: COMPILED_CALLS is None}
    return [path for path in PATHS if not lacking.get(path, False)]


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
    paths = available_paths()
    short = {PATHS[1]: "module/bnlab", PATHS[2]: "py/bnlab", PATHS[3]: "torch/bnlab"}
    print(f"{'shape':16s} {'call':17s} " + " ".join(f"{path:>26s}" for path in paths) + " "
          + " ".join(f"{short[path]:>12s}" for path in paths[1:]))  # fmt: skip
    for shape in args.shapes:
        for call, fns in calls(shape, args.mode).items():
            seconds = time_interleaved(fns, "cpu", args.rounds, args.min_sample)
            us = [seconds[path] * 1e6 for path in paths]
            ratio_text = " ".join(f"{v / us[0]:12.2f}" for v in us[1:])
            values = " ".join(f"{v:26.1f}" for v in us)
            print(f"{str(shape):16s} {call:17s} {values} {ratio_text}", flush=True)


if __name__ == "__main__":
    main()
