"""Wall time of the init-sweep's training (96 networks × 200 updates + 20 training-accuracy passes).

Trains the full sweep (3 seeds, both units) in each variant, interleaved round by round, and
prints the median wall and CPU time per variant. Variants: the first layer in its dual form
(the default for this sweep) or primal, and bnlab's or torch.nn's BatchNorm; ``dual-bnlab-python``
runs bnlab's BatchNorm with its compiled whole calls off (bnlab._fastpath.python_path_only).

    PYTHONPATH=src python benchmarks/lab_init_sweep.py [--repeats 3] [--threads N] [--variants dual-bnlab,primal-bnlab]

The issue's target: at most 12 s wall on a quiet 2-core machine for `bnlab run init-sweep`'s
training. On a machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE (see
docs/experiments.md): with the default policy two OpenMP threads can wait milliseconds for each
other at every operation when another process holds a core.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bnlab._fastpath import python_path_only
from bnlab.lab.experiments import init_sweep
from bnlab.lab.runner import RunContext

VARIANTS = {"dual-bnlab": ("dual", "bnlab"), "primal-bnlab": ("primal", "bnlab"), "dual-torch": ("dual", "torch"),
            "dual-bnlab-python": ("dual", "bnlab", True)}  # fmt: skip


def run_once(first_layer: str, bn: str, python_path: bool = False) -> tuple[float, float]:
    params = {**init_sweep._params(False), "first_layer": first_layer}
    config = {"params": params, "seeds": [0, 1, 2], "bn": bn, "quick": False, "dataset": "mnist", "data_dir": None}
    ctx = RunContext(None, config, torch.device("cpu"))
    ctx.data  # load the data outside the timed region, as `bnlab run` does once per run
    wall, cpu = time.perf_counter(), time.process_time()
    with python_path_only() if python_path else contextlib.nullcontext():
        for unit in ("bn", "plain"):
            init_sweep._run_unit(unit, ctx)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", default="dual-bnlab,primal-bnlab,dual-torch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: expected names from {', '.join(VARIANTS)}, got {', '.join(map(repr, unknown))}")
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:  # interleaved: every round runs every variant once
            times[name].append(run_once(*VARIANTS[name]))
            print(f"round {r + 1}: {name:<17} wall {times[name][-1][0]:6.2f} s  cpu {times[name][-1][1]:6.2f} s", flush=True)
    print(f"\n{torch.get_num_threads()} torch threads; medians over {args.repeats} rounds:")
    for name in names:
        walls, cpus = zip(*times[name])
        print(f"  {name:<17} wall {statistics.median(walls):6.2f} s   cpu {statistics.median(cpus):6.2f} s")


if __name__ == "__main__":
    main()
