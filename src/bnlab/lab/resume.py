"""Which run a `bnlab run --resume` continues, and what it must agree with.

The newest time-stamped folder where no --out names one; the options that define what a run
computes (a resumed run takes them as stored, and refuses others); a folder this process can
write; and the commit the run was made with, which a resume under other code adds to.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bnlab.lab.runs import RunFolder, atomic_write_json
from bnlab.lab.tables import counted

if TYPE_CHECKING:
    from bnlab.lab.experiments import Experiment
    from bnlab.lab.runner import RunOptions

__all__ = ["newest_run", "absolute_dir", "check_resume", "check_writable", "note_other_code"]

# The options that define what a run computes: a resumed run must agree with the stored ones.
_IDENTITY = ("quick", "seeds", "bn", "dataset", "data_dir", "world_size", "sync_bn", "shapes")
# for run folders made before these options existed
_STORED_DEFAULTS = {"world_size": 1, "sync_bn": False, "shapes": None}


def newest_run(name: str, root: str | Path = "runs", need_config: bool = True) -> Path | None:
    """The most recent runs/NAME-* folder holding a run (or, without ``need_config``, any such folder), or None."""
    # only the folders default_out names (NAME-YYYYmmdd-HHMMSS, and -2, -3, ... for runs started in the
    # same second: runner._create_stamped), in order of time: a folder named by hand (runs/NAME-baseline)
    # sorted after every stamp and was resumed instead
    stamped = re.compile(re.escape(name) + r"-(\d{8}-\d{6})(?:-(\d+))?")
    found = []
    for p in Path(root).glob(f"{name}-*"):
        match = stamped.fullmatch(p.name)
        if match and ((p / "config.json").is_file() or (not need_config and p.is_dir())):
            found.append(((match.group(1), int(match.group(2) or 1)), p))
    return max(found)[1] if found else None


def absolute_dir(data_dir: str | None) -> str | None:
    """--data-dir as an absolute path: a run resumed from another working directory finds it too."""
    return str(Path(data_dir).expanduser().resolve()) if data_dir else None


def check_resume(stored: dict, opts: RunOptions, exp: Experiment, out, launched: int | None = None) -> None:
    """Refuse to resume ``stored`` (a run folder's config at ``out``) as another experiment, or with
    options that define the run given otherwise (``launched``: torchrun's world size, if any)."""
    if stored.get("experiment", exp.name) != exp.name:
        raise ValueError(f"--out: {out} holds a run of {stored['experiment']}, not of {exp.name}; resume it with "
                         f"`bnlab run {stored['experiment']} --resume --out {out}`, or choose another --out")
    given = {"quick": opts.quick, "seeds": opts.seeds, "bn": opts.bn, "dataset": opts.dataset,
             "data_dir": absolute_dir(opts.data_dir),
             "world_size": launched or opts.nproc, "sync_bn": opts.sync_bn or None, "shapes": opts.shapes}
    # (runs made before the forty-ninth session kept --data-dir as typed)
    stored = {**stored, "data_dir": absolute_dir(stored.get("data_dir"))}
    diffs = [f"{k}: stored {stored.get(k, _STORED_DEFAULTS.get(k))!r}, given {v!r}" for k, v in given.items()
             if v is not None and k in _IDENTITY and v != stored.get(k, _STORED_DEFAULTS.get(k))]
    # the kind of device, not its index: units of a GPU run continued on the CPU (or back) had mixed
    # in one report that names one device; another GPU of the same kind computes alike
    if opts.device is not None and torch.device(opts.device).type != torch.device(stored.get("device") or "cpu").type:
        diffs.append(f"device: stored {stored.get('device') or 'cpu'!r}, given {opts.device!r}")
    if diffs:
        raise ValueError("--resume: the options differ from the run being resumed (" + "; ".join(diffs) +
                         "); drop them to continue as stored, or start a new run with another --out")


def check_writable(folder: RunFolder) -> None:
    """Refuse to resume into a folder this process cannot write, before any unit trains: the
    first finished unit failed to save, with a traceback, its work lost."""
    for place in (folder.path, folder.path / "units"):
        if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
            raise ValueError(f"--out: expected a folder bnlab can write to continue the run, got {folder.path} "
                             f"({place} is not writable)")


def note_other_code(name: str, folder: RunFolder, config: dict, now: str | None) -> str | None:
    """Where the run being resumed was made by other code than commit ``now``, add ``now`` to the
    config's ``resumed_with`` (the report's provenance line names it) and return the line that says
    so (None where nothing differs): a resumed run's report named only the first commit, though its
    later units came from another."""
    made = config.get("git_commit")
    if not (made and now and now != made and _record_resumed(folder, config, "resumed_with", now)):
        return None
    return (f"{name}: the run was made at commit {made[:12]}, this is {now[:12]}: the units trained now come "
            "from other code than the finished ones")


def note_other_threads(name: str, folder: RunFolder, config: dict, now: int) -> str | None:
    """The same for torch's thread count (``now``, this process's): a resumed run's units trained with
    another count than the finished ones, which torch's convolutions and matrix products round
    differently (bnlab's own layers give the same bits on any count), had mixed into one report that
    named the first count only. Recorded in ``resumed_threads``; None where nothing differs."""
    made = config.get("torch_threads")
    if not (made and now != made and _record_resumed(folder, config, "resumed_threads", now)):
        return None
    return (f"{name}: the run was made with {counted(made, 'torch thread')}, this process has {now}: torch's "
            "convolutions and matrix products round differently, so the units trained now may differ in the last "
            f"digits from an uninterrupted run (OMP_NUM_THREADS={made} resumes as it was made)")


def _record_resumed(folder: RunFolder, config: dict, key: str, value) -> bool:
    """Add ``value`` to the config's list ``key`` (and write the config) unless it is there; whether it was added."""
    if value in config.get(key, []):
        return False
    config[key] = [*config.get(key, []), value]
    atomic_write_json(folder.path / "config.json", config)
    return True
