"""Run folders: where an experiment keeps its configuration, results, figures and report.

A run folder holds

    config.json      the resolved configuration: experiment, parameters, seeds, versions, git commit
    units/*.json     one file per finished unit of work (its rows, metrics and tables, its wall time)
    metrics.jsonl    every metric record of the finished units, one JSON object per line
    summary.json     {"rows": [one flat record per trained network], "tables": {...}, ...}
    summary.csv      the rows as CSV (and table_NAME.csv for each extra table)
    *.png, report.md the figures and the report, rebuilt from the files above alone
    .lock            held (flock) by the process writing the folder, so that no second one trains beside it

Every file is written atomically (a temporary file, then ``os.replace``), and a unit's results
are written only when the unit has finished, so a run killed at any moment loses nothing that
finished; run again with ``--resume`` it skips the units that have a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["RunFolder", "atomic_write_text", "atomic_write_json", "clean_json", "new_file_mode", "progress"]


def new_file_mode() -> int:
    """The permissions an ordinary new file gets (0o666 minus the umask); mkstemp's own are 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return clean_json(value.item())  # NumPy / torch scalars
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (NaN and inf become null), atomically."""
    atomic_write_text(path, json.dumps(clean_json(obj), indent=1, allow_nan=False) + "\n")


def _unit_filename(unit: str) -> str:
    """A file name for a unit id such as 'seed=0,bn=True' (letters, digits, '=', ',', '.', '-' kept)."""
    return re.sub(r"[^A-Za-z0-9=,.\-]+", "_", unit) + ".json"


def _csv_text(rows: list[dict]) -> str:
    """Rows as CSV, columns in order of first appearance; None is written as an empty cell."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


class RunFolder:
    """The files of one run of one experiment (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: dict) -> "RunFolder":
        """A new run folder holding ``config``; refuses a folder that already holds a run, also one
        that another process made meanwhile (config.json is linked into place, which fails where
        one exists: two runs started on one --out at once had both written theirs and reported
        success, one run's results lost)."""
        folder = cls.ensure_new(path)
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the way, a read-only or forbidden place: say which option
            raise _not_writable(folder.path, err) from err
        try:
            _exclusive_write_json(folder.path / "config.json", config)
        except FileExistsError:  # made meanwhile by another process (only the link fails so)
            raise cls._holds_a_run(folder.path) from None
        except OSError as err:
            raise _not_writable(folder.path, err) from err
        return folder

    @classmethod
    def ensure_new(cls, path: str | os.PathLike) -> "RunFolder":
        """The folder at ``path``, which must not hold a run yet (nothing is created)."""
        folder = cls(path)
        if (folder.path / "config.json").exists():
            raise cls._holds_a_run(folder.path)
        units = folder.path / "units"
        if units.is_dir() and any(units.glob("*.json")):
            # results without the configuration that made them: a new run would take them as its own
            raise FileExistsError(f"--out: {folder.path} holds unit results but no config.json (a run whose "
                                  "configuration was deleted); choose another --out, or delete the folder")
        return folder

    @staticmethod
    def _holds_a_run(path: Path) -> FileExistsError:
        return FileExistsError(f"--out: {path} already holds a run; pass --resume to continue it, or choose another --out")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunFolder":
        """An existing run folder (one with a config.json)."""
        folder = cls(path)
        if not (folder.path / "config.json").is_file():
            raise FileNotFoundError(f"DIR: expected a run folder containing config.json, got {folder.path}")
        return folder

    @property
    def config(self) -> dict:
        """The resolved configuration written when the run was created."""
        path = self.path / "config.json"
        config = _read_json(path)
        if not isinstance(config, dict) or not isinstance(config.get("units"), list) or "experiment" not in config:
            raise ValueError(f"{path}: expected the configuration bnlab wrote (an object with 'experiment' and "
                             f"'units'), got {type(config).__name__}{' without them' if isinstance(config, dict) else ''}")
        return config

    def hold(self) -> None:
        """Hold the folder for this process until :meth:`release`: another `bnlab run` on it (a
        second --resume, a fresh run racing this one) is refused instead of training the same units
        (the runner holds it from before it reads which units are left until the report is
        written). An advisory lock (flock) on .lock, let go when the process ends, however it ends;
        where flock does not exist (Windows) or the file system refuses it (some NFS and FUSE
        mounts), nothing is held."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on the project's machines
            return
        f = open(self.path / ".lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FileExistsError(f"--out: another bnlab process is running in {self.path}; wait for it, or "
                                  "choose another --out") from None
        except OSError:  # no locks on this file system: run as before locks existed
            f.close()
            return
        _HELD[self.path.resolve()] = f
        self._drop_interrupted_writes()

    def _drop_interrupted_writes(self) -> None:
        """Remove the temporary files of atomic writes that a killed or interrupted run left (hidden
        ``.NAME.*.tmp`` of atomic_write_text, ``.STEM.*.png`` of plotting.save_figure): with the folder
        held, no other process is writing them. They had stayed after a --resume."""
        for pattern in (".*.tmp", ".*.png"):
            for leftover in self.path.rglob(pattern):
                with contextlib.suppress(OSError):
                    if leftover.is_file():
                        leftover.unlink()

    def release(self) -> None:
        """Let go of what :meth:`hold` took (nothing, where it took nothing)."""
        f = _HELD.pop(self.path.resolve(), None)
        if f is not None:
            f.close()  # (closing the file lets go of its flock)

    @contextlib.contextmanager
    def writing(self):
        """:meth:`hold` for the block, then :meth:`release`."""
        self.hold()
        try:
            yield self
        finally:
            self.release()

    # -- units of work ------------------------------------------------------------------------
    def unit_file(self, unit: str) -> Path:
        return self.path / "units" / _unit_filename(unit)

    def is_done(self, unit: str) -> bool:
        """Whether ``unit`` finished in this folder (its result file exists)."""
        return self.unit_file(unit).is_file()

    def save_unit(self, unit: str, result: dict) -> None:
        """Record a finished unit: ``result`` has 'rows', and optionally 'metrics', 'tables', 'wall_s'."""
        if not isinstance(result.get("rows"), list):
            raise ValueError(f"result: expected a dict with a list under 'rows', got keys {sorted(result)}")
        atomic_write_json(self.unit_file(unit), {"unit": unit, **result})

    def units(self) -> list[dict]:
        """The results of the finished units, in the order the configuration lists them."""
        done = []
        for unit in self.config["units"]:
            if self.is_done(unit):
                path = self.unit_file(unit)
                result = _read_json(path)
                if not isinstance(result, dict) or result.get("unit") != unit or not isinstance(result.get("rows"), list):
                    # a file copied or renamed from another unit was taken as this one's results
                    held = result.get("unit") if isinstance(result, dict) else None
                    raise ValueError(f"{path}: expected the results of unit {unit!r}, got "
                                     f"{'those of ' + repr(held) if held else 'no unit results'} (delete it to run "
                                     "that unit again with --resume)")
                done.append(result)
        return done

    # -- what the units produced --------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One flat record per trained network, over every finished unit."""
        return [row for u in self.units() for row in u["rows"]]

    def metrics(self) -> list[dict]:
        """Every metric record (e.g. one per network and epoch) of the finished units."""
        return [m for u in self.units() for m in u.get("metrics", [])]

    def table(self, name: str) -> list[dict]:
        """The records of the extra table ``name`` (e.g. 'batch_stats'), over every finished unit."""
        return [r for u in self.units() for r in u.get("tables", {}).get(name, [])]

    def table_names(self) -> list[str]:
        names: list[str] = []
        for u in self.units():
            names.extend(n for n in u.get("tables", {}) if n not in names)
        return names

    def write_summary(self) -> dict:
        """Rewrite summary.json, summary.csv, table_*.csv and metrics.jsonl from the finished units."""
        units = self.units()
        config = self.config
        summary = {
            "experiment": config.get("experiment"),
            "complete": len(units) == len(config.get("units", [])),
            "units_done": [u["unit"] for u in units],
            "wall_s": sum(u.get("wall_s", 0.0) for u in units),
            "cpu_s": sum(u.get("cpu_s", 0.0) for u in units),
            "rows": [row for u in units for row in u["rows"]],
            "tables": {name: self.table(name) for name in self.table_names()},
        }
        atomic_write_json(self.path / "summary.json", summary)
        atomic_write_text(self.path / "summary.csv", _csv_text(clean_json(summary["rows"])))
        for name, records in summary["tables"].items():
            atomic_write_text(self.path / f"table_{name}.csv", _csv_text(clean_json(records)))
        lines = (json.dumps(clean_json(m), allow_nan=False) for u in units for m in u.get("metrics", []))
        atomic_write_text(self.path / "metrics.jsonl", "".join(line + "\n" for line in lines))
        return summary

    def summary(self) -> dict:
        """summary.json as written by :meth:`write_summary`."""
        return _read_json(self.path / "summary.json")


def _not_writable(path: Path, err: OSError) -> ValueError:
    reason = err.strerror or type(err).__name__
    return ValueError(f"--out: expected a folder bnlab can create and write, got {path} ({reason}"
                      f"{': ' + str(err.filename) if err.filename else ''})")


#: The run folders this process holds (RunFolder.hold), by resolved path: the open .lock files.
_HELD: dict[Path, Any] = {}


def _exclusive_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as atomic_write_json does, but fail with FileExistsError where
    ``path`` exists: the file is written aside, then hard-linked into place (atomic, and never
    over another process's file)."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_json(aside, obj)
    try:
        os.link(aside, path)
    except FileExistsError:
        os.unlink(aside)
        raise
    except OSError:  # no hard links on this file system (some network or FUSE ones): a plain atomic replace
        os.replace(aside, path)
        return
    os.unlink(aside)


def _read_json(path: Path) -> dict:
    """A file this module wrote (atomically, so only a hand edit or a damaged disk breaks one),
    named in the error where it cannot be parsed."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            hint = " (delete it to run that unit again with --resume)" if path.parent.name == "units" else ""
            raise ValueError(f"{path}: expected the JSON bnlab wrote, got a damaged file ({err}){hint}") from err


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", leave: bool = False):
    """A tqdm progress bar on stderr, shown only when stderr, where it draws, is a terminal: never in
    logs or tests, and still there when stdout goes through a pipe (``bnlab run ... | tee log``)."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not sys.stderr.isatty(), dynamic_ncols=True,
                file=sys.stderr)
