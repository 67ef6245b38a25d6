"""The `bnlab` command line.

    bnlab selfcheck        compare bnlab's layers with torch.nn's on random data
"""

from __future__ import annotations

import argparse
import sys


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from bnlab.lab.selfcheck import format_rows, run_selfcheck

    rows = run_selfcheck(steps=args.steps, seed=args.seed)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization: the layer, the reference, the lab.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="compare bnlab's BatchNorm with torch.nn's on random data")
    p.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bnlab` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
