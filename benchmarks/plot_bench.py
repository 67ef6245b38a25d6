"""A figure of a bench_bn.py results file: bnlab against torch.nn and against a copy, case by case.

Claim shown (README, docs/benchmarks.md): how many times faster than torch.nn's BatchNorm bnlab
is in each benchmarked case, and what fraction of a copy's bandwidth it reaches, at a glance
beside the tables. The figure is bnlab.lab.speed_plot's (its panels, colours and target lines are
described there); the machine, thread count (or the GPU) and torch version come from the file's
first line; several files make one figure (the first one's machine named). Nothing is measured
here: the figure only reads the files.

    python benchmarks/plot_bench.py benchmarks/results/bench_bn_zen3_s35.jsonl --out docs/figures/speed_cpu.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_results
from bnlab.lab.plotting import save_figure
from bnlab.lab.speed_plot import figure


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """(environment, cases) of a bench_bn.py JSON-lines file: its first line's environment and
    command, and every case line, in file order (bench_results.read). ValueError naming the
    argument and the file when it cannot be read, holds a line that is not JSON, or holds no case."""
    try:
        env, cases = bench_results.read(path)
    except ValueError as exc:
        raise ValueError(f"results: {exc}") from None
    if not cases:
        raise ValueError(f"results: expected bench_bn.py case lines (with 'ratios') in {path}, found none")
    return env, cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_bn.py --out files (JSON lines; the first one's machine in the title)")
    p.add_argument("--out", required=True, help="the PNG to write (atomically)")
    args = p.parse_args(argv)
    try:
        loaded = [load(path) for path in args.results]
    except ValueError as exc:
        p.error(str(exc))
    env, cases = loaded[0][0], [case for _, file_cases in loaded for case in file_cases]
    path = save_figure(figure(env, cases), args.out)
    print(f"wrote {path} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
