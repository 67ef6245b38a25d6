"""Runs an experiment into a run folder: resolves the configuration, runs the unfinished units, reports.

``run_experiment(name, RunOptions(...))`` is what ``bnlab run NAME`` calls. Each unit of work
starts from a fixed global seed derived from its id, so a unit gives the same numbers whether
it runs in a fresh run or in a resumed one, after any other units.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import time
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from bnlab.lab import data as lab_data
from bnlab.lab.experiments import Experiment, get
from bnlab.lab.models import BN_IMPLS
from bnlab.lab.runs import RunFolder, progress

__all__ = ["RunOptions", "RunContext", "run_experiment", "default_out", "newest_run", "environment"]

# The options that define what a run computes: a resumed run must agree with the stored ones.
_IDENTITY = ("quick", "seeds", "bn", "dataset", "data_dir")


@dataclass
class RunOptions:
    """Options of `bnlab run`; None means "the default", or "as stored" when resuming."""

    quick: bool | None = None
    seeds: list[int] | None = None
    out: Path | None = None
    device: str | None = None
    resume: bool = False
    bn: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    command: str | None = None


class RunContext:
    """What a unit of work sees: the configuration, its parameters, the device and the data."""

    def __init__(self, folder: RunFolder, config: dict, device: torch.device,
                 data: tuple[lab_data.Split, lab_data.Split] | None = None) -> None:
        self.folder, self.config, self.device = folder, config, device
        self.params: dict = config["params"]
        self.seeds: list[int] = config["seeds"]
        self.bn: str = config["bn"]
        self.quick: bool = config["quick"]
        self._data = data

    @property
    def data(self) -> tuple[lab_data.Split, lab_data.Split]:
        """(train, test) splits of the configured dataset, on the CPU (loaded once per run)."""
        if self._data is None:
            self._data = lab_data.load(self.config["dataset"], self.config["data_dir"])
        return self._data


def default_out(name: str, root: str | Path = "runs") -> Path:
    """runs/NAME-YYYYmmdd-HHMMSS (relative to the working directory)."""
    return Path(root) / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def newest_run(name: str, root: str | Path = "runs", need_config: bool = True) -> Path | None:
    """The most recent runs/NAME-* folder holding a run (or, without ``need_config``, any such folder), or None."""
    candidates = sorted(p for p in Path(root).glob(f"{name}-*")
                        if (p / "config.json").is_file() or (not need_config and p.is_dir()))
    return candidates[-1] if candidates else None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Package versions, machine and git commit, recorded in every config.json."""
    versions = {"python": platform.python_version()}
    for package in ("bnlab", "torch", "numpy", "matplotlib", "tqdm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "machine": f"{platform.system()} {platform.machine()}",
            "torch_threads": torch.get_num_threads(), "git_commit": _git_commit()}


def _resolve(exp: Experiment, opts: RunOptions) -> dict:
    quick = bool(opts.quick)
    seeds = list(opts.seeds) if opts.seeds is not None else list(exp.seeds[1] if quick else exp.seeds[0])
    dataset = opts.dataset or exp.datasets[0]
    if dataset not in exp.datasets:
        raise ValueError(f"--dataset: {exp.name} expected one of {list(exp.datasets)}, got {dataset!r}")
    bn = opts.bn or "bnlab"
    if bn not in BN_IMPLS:
        raise ValueError(f"--bn: expected one of {list(BN_IMPLS)}, got {bn!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers, got {seeds}")
    config = {"experiment": exp.name, "quick": quick, "seeds": seeds, "bn": bn, "dataset": dataset,
              "data_dir": str(opts.data_dir) if opts.data_dir else None, "device": opts.device or "cpu",
              "params": {}}
    config["params"] = exp.params(config)
    config["units"] = exp.units(config)
    config["command"] = opts.command
    config["created"] = _dt.datetime.now().isoformat(timespec="seconds")
    config.update(environment())
    return config


def _check_resume(stored: dict, opts: RunOptions) -> None:
    given = {"quick": opts.quick, "seeds": opts.seeds, "bn": opts.bn, "dataset": opts.dataset,
             "data_dir": str(opts.data_dir) if opts.data_dir else None}
    diffs = [f"{k}: stored {stored.get(k)!r}, given {v!r}" for k, v in given.items()
             if v is not None and k in _IDENTITY and v != stored.get(k)]
    if diffs:
        raise ValueError("--resume: the options differ from the run being resumed (" + "; ".join(diffs) +
                         "); drop them to continue as stored, or start a new run with another --out")


def run_experiment(name: str, opts: RunOptions) -> RunFolder:
    """Run (or resume) experiment ``name`` and write its summary, figures and report.

    Returns:
        The run folder.
    """
    exp = get(name)
    data = None
    out = opts.out
    if opts.resume and out is None:
        out = newest_run(exp.name)
    if out is None:
        out = default_out(exp.name)
    if opts.resume and (Path(out) / "config.json").is_file():
        folder = RunFolder.open(out)
        _check_resume(folder.config, opts)
        config = folder.config
    else:
        config = _resolve(exp, opts)
        RunFolder.ensure_new(out)
        data = lab_data.load(config["dataset"], config["data_dir"])  # a missing file fails before any folder exists
        folder = RunFolder.create(out, config)
    device = torch.device(opts.device or config["device"])
    ctx = RunContext(folder, config, device, data)
    todo = [u for u in config["units"] if not folder.is_done(u)]
    for unit in progress(todo, desc=exp.name, leave=True):
        torch.manual_seed(zlib.crc32(f"{exp.name}/{unit}".encode()))
        start, cpu_start = time.perf_counter(), time.process_time()
        result = exp.run_unit(unit, ctx)
        result["wall_s"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu_start  # CPU seconds of all threads: steadier than wall time on a busy machine
        result["device"] = str(device)
        folder.save_unit(unit, result)
        folder.write_summary()
    if not todo:
        folder.write_summary()
    from bnlab.lab.report import write_report

    write_report(folder)
    return folder


def main_progress_note(folder: RunFolder) -> str:
    """The line `bnlab run` prints at the end: where the report is, and the wall time."""
    summary = folder.summary()
    return f"{summary['experiment']}: {len(summary['rows'])} networks in {summary['wall_s']:.1f} s -> {folder.path / 'report.md'}"
