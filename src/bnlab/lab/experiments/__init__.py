"""The lab's experiments: one module per experiment, each defining ``EXPERIMENT``.

To add one, write ``experiments/my_name.py`` defining ``EXPERIMENT = Experiment(...)`` and add
the module name to ``_MODULES`` (DEVELOPERS.md, "Adding a lab experiment").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from bnlab.lab.runner import RunContext
    from bnlab.lab.runs import RunFolder

__all__ = ["Experiment", "registry", "get"]


@dataclass(frozen=True)
class Experiment:
    """What the runner, `bnlab list` and `bnlab report` need to know about one experiment.

    Attributes:
        name: the command-line name, e.g. "init-sweep".
        summary: one line for `bnlab list`.
        runtime: expected wall time, full and quick, e.g. "~12 s (quick ~1 s)".
        claim: the seeds' claim this experiment tests, in a sentence (opens the report).
        params: params(config) -> the experiment's parameters (a JSON-able dict); ``config`` holds the
            run's "quick", "seeds", "dataset", "data_dir" and "bn".
        seeds: (full, quick) default seeds.
        units: units(config) -> the ids of the units of work, in order. A unit is the grain of
            resume: it runs whole or not at all and its results are saved when it finishes.
        run_unit: run_unit(unit, ctx) -> {"rows": [...], "metrics": [...], "tables": {...}}.
        figures: figures(folder) -> [(file name, caption)]: draws the PNGs from the folder alone.
        findings: findings(folder) -> Markdown: what was measured, with the numbers, from the folder alone.
        datasets: the --dataset values it accepts; the first is the default.
        distributed: run_unit trains under DistributedDataParallel when the run has several processes
            (``--nproc N`` or torchrun): it wraps its model with ``ctx.parallel``, shards its batches
            with ``ctx.world.shard`` and evaluates on ``ctx.is_main`` only. False: one process only.
        world_sizes: (full, quick) number of processes the runner starts when neither ``--nproc`` nor
            torchrun says; more than 1 only for experiments that compare processes (small-batch-sync).
        row_noun: what one row of the summary is, for the report and the line `bnlab run` ends with
            ("96 networks in 10.7 s"): "network" for the experiments that train, "case" for speed.
        trains: False for an experiment that trains nothing (speed): the runner loads no dataset for
            it, and its report names no seeds, BN implementation or data.
        takes_shapes: whether ``bnlab run NAME --shapes ...`` applies (config["shapes"]: a list of
            shapes, or None); the others refuse the option.
    """

    name: str
    summary: str
    runtime: str
    claim: str
    params: Callable[[dict], dict]
    seeds: tuple[tuple[int, ...], tuple[int, ...]]
    units: Callable[[dict], list[str]]
    run_unit: Callable[[str, "RunContext"], dict]
    figures: Callable[["RunFolder"], list[tuple[str, str]]]
    findings: Callable[["RunFolder"], str]
    datasets: tuple[str, ...] = ("mnist",)
    distributed: bool = False
    world_sizes: tuple[int, int] = (1, 1)
    row_noun: str = "network"
    trains: bool = True
    takes_shapes: bool = False


_MODULES = ["init_sweep", "lr_sweep", "activations", "inference", "conv", "resnet", "regularization",
            "batch_size", "small_batch_sync", "speed"]


def registry() -> dict[str, Experiment]:
    """Every experiment by name, in the order `bnlab list` shows them."""
    experiments = [importlib.import_module(f"bnlab.lab.experiments.{m}").EXPERIMENT for m in _MODULES]
    return {e.name: e for e in experiments}


def get(name: str) -> Experiment:
    """The experiment called ``name``; the error lists the known names."""
    known = registry()
    if name not in known:
        raise ValueError(f"experiment: expected one of {list(known)}, got {name!r}")
    return known[name]
