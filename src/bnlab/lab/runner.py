"""Runs an experiment into a run folder: resolves the configuration, runs the unfinished units, reports.

``run_experiment(name, RunOptions(...))`` is what ``bnlab run NAME`` calls. Each unit of work
starts from a fixed global seed derived from its id, so a unit gives the same numbers whether
it runs in a fresh run or in a resumed one, after any other units.

Distributed runs (docs/distributed.md, "Running the lab distributed"): with ``--nproc N`` this
process prepares the run folder, starts N ranks (bnlab.launch.run_local_ranks) that run the
unfinished units together, and writes the report; under torchrun every process calls
``run_experiment``, rank 0 prepares the folder and tells the others. Only rank 0 writes to the
folder; every wait on another process times out.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from bnlab.lab import allocator
from bnlab.lab import data as lab_data
from bnlab.lab.experiments import Experiment, get
from bnlab.lab.models import BN_IMPLS
from bnlab.lab.resume import (absolute_dir, check_resume, check_writable, newest_run, note_other_code,
                              note_other_threads)
from bnlab.lab.runs import RunFolder, progress
from bnlab.lab.tables import counted
from bnlab.lab.world import SINGLE, World, current_world, default_timeout_s, parallel, rank_device, share_from_main

__all__ = ["RunOptions", "RunContext", "run_experiment", "run_units", "default_out", "environment", "TRAINING_OPTIONS"]

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
    nproc: int | None = None
    sync_bn: bool | None = None
    timeout_s: float | None = None
    shapes: list[list[int]] | None = None


class RunContext:
    """What a unit of work sees: the configuration, its parameters, the device, the data, its rank."""

    def __init__(self, folder: RunFolder, config: dict, device: torch.device,
                 data: tuple[lab_data.Split, lab_data.Split] | None = None, world: World = SINGLE) -> None:
        self.folder, self.config, self.device = folder, config, device
        self.params: dict = config["params"]
        self.seeds: list[int] = config["seeds"]
        self.bn: str = config["bn"]
        self.quick: bool = config["quick"]
        self.world = world
        self.sync_bn: bool = config.get("sync_bn", False)
        self._data = data

    @property
    def is_main(self) -> bool:
        """Whether this process evaluates and reports (rank 0, or the only process)."""
        return self.world.is_main

    def parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` ready to train in this run: SyncBatchNorm with --sync-bn, DDP with several processes.

        Evaluate ``model`` itself, not the returned wrapper (bnlab.lab.world.parallel).
        """
        return parallel(model, self.world, self.sync_bn)

    @property
    def data(self) -> tuple[lab_data.Split, lab_data.Split]:
        """(train, test) splits of the configured dataset, on the CPU (loaded once per run)."""
        if self._data is None:
            self._data = lab_data.load(self.config["dataset"], self.config["data_dir"])
        return self._data


def default_out(name: str, root: str | Path = "runs") -> Path:
    """runs/NAME-YYYYmmdd-HHMMSS (relative to the working directory)."""
    return Path(root) / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _create_stamped(out: Path, config: dict) -> RunFolder:
    """The new run folder at ``out`` (a default_out name), or at ``out``-2, -3, ... where runs started
    in the same second took it: two `bnlab run NAME` started at once had the second refused, its
    --out named though none was given."""
    for k in range(1, 100):
        try:
            return RunFolder.create(out if k == 1 else out.with_name(f"{out.name}-{k}"), config)
        except FileExistsError:
            continue
    return RunFolder.create(out, config)  # a hundred taken: the usual refusal, naming the folder


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
            "torch_threads": torch.get_num_threads(), "allocator": allocator.setting(), "git_commit": _git_commit()}


def _world_size(exp: Experiment, opts: RunOptions, quick: bool, launched: int | None) -> int:
    """The number of processes: torchrun's, else --nproc, else the experiment's default."""
    if opts.nproc is not None and (isinstance(opts.nproc, bool) or not isinstance(opts.nproc, int) or opts.nproc < 1):
        raise ValueError(f"--nproc: expected an integer >= 1 (processes to start), got {opts.nproc!r}")
    if launched is not None:
        if opts.nproc is not None and opts.nproc != launched:
            raise ValueError(f"--nproc: this process was started by torchrun with WORLD_SIZE={launched}, got "
                             f"--nproc {opts.nproc}; drop --nproc under torchrun")
        return launched
    return opts.nproc or exp.world_sizes[1 if quick else 0]


def _check_world(exp: Experiment, world_size: int, sync_bn: bool) -> None:
    from bnlab.lab.experiments import registry

    if world_size > 1 and not exp.distributed:
        able = [name for name, e in registry().items() if e.distributed]
        raise ValueError(f"--nproc: {exp.name} runs in one process only, got {world_size} processes "
                         f"(--nproc or torchrun); experiments that run distributed: {', '.join(able)}")
    if sync_bn and world_size == 1:
        raise ValueError("--sync-bn: expected a run with several processes (--nproc N or torchrun), got one "
                         "process, where SyncBatchNorm is plain BN")


#: The RunOptions that choose what trains: an experiment that trains nothing refuses them, and
#: `run all` runs it without them.
TRAINING_OPTIONS = ("bn", "seeds", "dataset", "data_dir")


def _check_training_options(exp: Experiment, opts: RunOptions) -> None:
    """An experiment that trains nothing (speed) refuses the options that choose what trains."""
    if exp.trains:
        return
    for name in TRAINING_OPTIONS:
        value, option = getattr(opts, name), "--" + name.replace("_", "-")
        if value is not None:
            raise ValueError(f"{option}: {exp.name} trains no network (it times bnlab's BatchNorm against torch.nn's), "
                             f"got {option} {value if not isinstance(value, list) else ','.join(map(str, value))}; "
                             "drop it")


def _resolve(exp: Experiment, opts: RunOptions, launched: int | None = None) -> dict:
    _check_training_options(exp, opts)
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
    world_size, sync_bn = _world_size(exp, opts, quick, launched), bool(opts.sync_bn)
    _check_world(exp, world_size, sync_bn)
    if opts.shapes is not None and not exp.takes_shapes:
        from bnlab.lab.experiments import registry

        able = [name for name, e in registry().items() if e.takes_shapes]
        raise ValueError(f"--shapes: {exp.name} runs its own models, got --shapes for it; experiments that take "
                         f"shapes: {', '.join(able)}")
    config = {"experiment": exp.name, "quick": quick, "seeds": seeds, "bn": bn, "dataset": dataset,
              "data_dir": absolute_dir(opts.data_dir), "device": opts.device or "cpu",
              "world_size": world_size, "sync_bn": sync_bn, "shapes": opts.shapes, "params": {}}
    config["params"] = exp.params(config)
    _check_batch_shares(exp, config)
    config["units"] = exp.units(config)
    config["command"] = opts.command
    config["created"] = _dt.datetime.now().isoformat(timespec="seconds")
    config.update(environment())
    return config


def _check_batch_shares(exp: Experiment, config: dict) -> None:
    """Several processes share each global batch equally: refused before any folder exists (the
    run would fail at its first unit, every time it was resumed)."""
    batch, world = config["params"].get("batch_size"), config["world_size"]
    if isinstance(batch, int) and world > 1 and batch % world:
        fits = [n for n in range(2, min(batch, 16) + 1) if batch % n == 0]
        raise ValueError(f"--nproc: {exp.name} trains with a global batch of {batch}, which the processes share "
                         f"equally; expected a number of processes that divides it (such as "
                         f"{', '.join(map(str, fits))}), got {world}")


def _prepare(exp: Experiment, opts: RunOptions, launched: int | None = None):
    """(folder, config, data or None, unfinished units): a new run folder, or the one to resume."""
    data = None
    out = opts.out
    if opts.resume and out is None:
        out = newest_run(exp.name)
    stamped = out is None  # the folder is ours to name: another run started in the same second gets -2
    if stamped:
        out = default_out(exp.name)
    if opts.resume and (Path(out) / "config.json").is_file():
        folder = RunFolder.open(out)
        check_resume(folder.config, opts, exp, out, launched)
        check_writable(folder)
        folder.hold()  # before reading which units are left, and before writing anything
        config = folder.config
        for other in (note_other_code(exp.name, folder, config, _git_commit()),
                      note_other_threads(exp.name, folder, config, torch.get_num_threads())):
            if other:
                _note(other)
        done = sum(folder.is_done(u) for u in config["units"])
        _note(f"{exp.name}: resuming {out} ({'quick' if config['quick'] else 'full'} version): {done} of "
              f"{len(config['units'])} units already done")
    else:
        if opts.resume:
            where = f"no run folder at {out}" if opts.out else f"no runs/{exp.name}-*"
            _note(f"{exp.name}: --resume found no run to continue ({where}); starting a new one")
        config = _resolve(exp, opts, launched)
        if not stamped:
            RunFolder.ensure_new(out)
        if exp.trains:  # a missing file fails before any folder exists
            data = lab_data.load(config["dataset"], config["data_dir"])
        folder = _create_stamped(out, config) if stamped else RunFolder.create(out, config)
        folder.hold()
    return folder, config, data, [u for u in config["units"] if not folder.is_done(u)]


def _note(text: str) -> None:
    """A line for the user on stderr (where the progress bars go), shown whatever stdout is."""
    print(text, file=sys.stderr, flush=True)


def run_units(exp: Experiment, ctx: RunContext, todo: list[str]) -> None:
    """Run the units ``todo`` in this process; rank 0 saves each one as it finishes.

    In a distributed run every rank calls this with the same list, so that the ranks train each
    unit together; a failure is re-raised naming the rank and the unit.
    """
    world, folder = ctx.world, ctx.folder
    for unit in progress(todo, desc=exp.name, leave=True) if world.is_main else todo:
        torch.manual_seed(zlib.crc32(f"{exp.name}/{unit}".encode()))
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = exp.run_unit(unit, ctx)
        except RuntimeError as err:
            if world.size == 1:
                raise
            raise RuntimeError(f"rank {world.rank} of {world.size}: unit {unit!r} failed: {err} (in a distributed run "
                               "this often means that another rank failed or a collective timed out)") from err
        if not world.is_main:
            continue
        result["wall_s"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu_start  # CPU seconds of all threads: steadier than wall time on a busy machine
        result["device"] = str(ctx.device)
        folder.save_unit(unit, result)
        folder.write_summary()
    if world.is_main and not todo:
        folder.write_summary()


def _rank_main(rank: int, world_size: int, name: str, path: str, config: dict, todo: list[str], device: str) -> None:
    """One rank of ``bnlab run --nproc N`` (started by bnlab.launch.run_local_ranks in a new process)."""
    world = World(rank, world_size, rank_device(device, rank))
    run_units(get(name), RunContext(RunFolder(path), config, world.device, world=world), todo)


def _launch_ranks(exp: Experiment, folder: RunFolder, config: dict, todo: list[str], opts: RunOptions) -> None:
    """Run ``todo`` on config["world_size"] new local processes; raises LocalRanksError if any fails."""
    from bnlab.launch import run_local_ranks

    device = opts.device or config["device"]
    run_local_ranks(_rank_main, config["world_size"], (exp.name, str(folder.path), config, todo, device),
                    backend="nccl" if torch.device(device).type == "cuda" else "gloo",
                    timeout_s=math.inf,  # lab runs may take hours; every wait inside is bounded by the collective timeout
                    collective_timeout_s=opts.timeout_s or default_timeout_s(config["quick"]))


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C while a run's units trained or its report was written: ``folder`` holds the units that
    finished (the command line names it in its advice; before the folder exists a plain
    KeyboardInterrupt goes up, which `run all` turns into this once an earlier experiment ran)."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = Path(folder)


def run_experiment(name: str, opts: RunOptions) -> RunFolder:
    """Run (or resume) experiment ``name`` and write its summary, figures and report.

    With one process and config["world_size"] > 1 (``--nproc``, or an experiment that compares
    processes), starts the ranks itself; under torchrun (a default process group exists), this
    process is one of the ranks.

    Returns:
        The run folder.
    """
    exp = get(name)
    world = current_world(opts.device or "cpu")
    if world.size > 1:  # one of torchrun's processes: rank 0 prepares the folder and tells the others
        path, config, todo = share_from_main(lambda: _shareable(*_prepare(exp, opts, world.size)), world)
        folder, data = RunFolder(path), None
        world = current_world(opts.device or config["device"])
    else:
        folder, config, data, todo = _prepare(exp, opts)
        world = World(device=torch.device(opts.device or config["device"]))
    try:  # the folder is held from _prepare on (by rank 0 under torchrun), and let go here
        if world.size == 1 and config.get("world_size", 1) > 1:
            _launch_ranks(exp, folder, config, todo, opts)
        else:
            run_units(exp, RunContext(folder, config, world.device, data, world), todo)
        if world.is_main:
            from bnlab.lab.report import write_report

            write_report(folder)  # (Ctrl-C here too leaves the units, which --resume reports)
    except KeyboardInterrupt as err:
        raise RunInterrupted(folder.path) from err
    finally:
        folder.release()
    return folder


def _shareable(folder: RunFolder, config: dict, data, todo: list[str]) -> tuple[str, dict, list[str]]:
    return str(folder.path), config, todo


def main_progress_note(folder: RunFolder) -> str:
    """The line `bnlab run` prints at the end: where the report is, and the wall time."""
    summary = folder.summary()
    n, noun = len(summary["rows"]), get(summary["experiment"]).row_noun
    return f"{summary['experiment']}: {counted(n, noun)} in {summary['wall_s']:.1f} s -> {folder.path / 'report.md'}"
