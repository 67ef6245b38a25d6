"""The benchmark scripts' command-line helpers, and the cases bench_bn.py compares.

The cases and their contenders (bnlab, torch eager, torch.compile'd torch, a copy) live in the
package, ``bnlab.lab.speed_cases``, which the lab's ``speed`` experiment runs too; they are
re-exported here under the names the scripts import.
"""

from __future__ import annotations

import argparse
import math

import torch

from bnlab.lab.arg_text import parse_shape, positive_int
from bnlab.lab.speed_cases import (BN_BY_RANK, DTYPES, MODES, TRAFFIC, TRAFFIC_GPU, bn_layer, contenders,
                                   make_input, sample_grad_mode, traffic_bytes)

__all__ = ["BN_BY_RANK", "DTYPES", "MODES", "TRAFFIC", "TRAFFIC_GPU", "bn_layer", "contenders", "make_input",
           "sample_grad_mode", "traffic_bytes", "nchw_shape", "positive_int", "refuse_unknown_names",
           "positive_float", "shape_parser", "shape_arg", "shapes_parser", "parse_and_announce"]


def nchw_shape(text: str) -> tuple[int, int, int, int]:
    """An (N, C, H, W) shape from "64,256,14,14": the ``type=`` of the scripts' --shape options
    (argparse turns the error into "argument --shape: expected ...")."""
    try:
        return parse_shape(text, rank=4)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def refuse_unknown_names(parser: argparse.ArgumentParser, args, allowed: dict) -> None:
    """parser.error naming the option and the unknown names, for each comma-separated option of
    ``allowed`` ({attribute: the names it may hold}) that holds another name."""
    for option, known in allowed.items():
        unknown = [v for v in getattr(args, option).split(",") if v not in known]
        if unknown:
            parser.error(f"--{option}: expected names from {list(known)}, got {', '.join(map(repr, unknown))}")


def positive_float(text: str) -> float:
    """The ``type=`` of the scripts' durations (--seconds): "argument --seconds: expected a positive
    number, got '-5'"."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def shape_parser(doc: str, default_shape: str, any_rank: bool = False) -> argparse.ArgumentParser:
    """The command line the per-shape scripts open with (eval_overhead.py, step_overhead.py,
    cold_call.py, eval_order.py, idle_ramp.py, eval_paths.py): the description from the script's
    docstring, --shape (N,C,H,W; N,C[,spatial...] where any_rank) and --threads (torch's intra-op
    threads, which bnlab's kernels follow)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    form = "N,C[,spatial...]" if any_rank else "N,C,H,W"
    p.add_argument("--shape", type=shape_arg if any_rank else nchw_shape, default=default_shape,
                   help=f"{form} (default {default_shape})")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    return p


def shape_arg(text: str) -> tuple[int, ...]:
    """N,C[,spatial...] of positive sizes, 2 to 5 of them (the accuracy scripts' --shapes)."""
    try:
        return parse_shape(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def shapes_parser(doc: str, default_shapes) -> argparse.ArgumentParser:
    """The command line the accuracy scripts open with (stats_accuracy_16bit.py, dx_accuracy.py):
    the description from the script's docstring, --shapes (any rank) and --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape_arg, default=[shape_arg(s) for s in default_shapes])
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    return p


def parse_and_announce(p: argparse.ArgumentParser, argv, script: str, what: str):
    """The parsed arguments, torch's threads set from --threads, and the first line of the output:
    the script, its thread count, torch's version and what the figures are."""
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {script} --threads {args.threads}; torch {torch.__version__}; {what}")
    return args
