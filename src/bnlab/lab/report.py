"""report.md of a run, written from the run folder alone (`bnlab report DIR` rebuilds it).

The report says what the experiment tests, what was measured (the experiment's own findings,
with numbers computed from summary.json and metrics.jsonl), shows the figures inline, and
records how the run was made: command, seeds, versions, commit, wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.lab.experiments import get
from bnlab.lab.runs import RunFolder, atomic_write_text

__all__ = ["write_report"]


def _short(value) -> str:
    """A parameter value for the report: floats to 4 significant digits, long lists shortened."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        items = [_short(v) for v in value]
        if len(items) > 8:
            return "[" + ", ".join(items[:3] + ["…"] + items[-2:]) + f"] ({len(value)} values)"
        return "[" + ", ".join(items) + "]"
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


def _threads(n) -> str:
    return f"{n} torch thread{'' if n == 1 else 's'}"


def _resumed_threads(c: dict) -> str:
    """'; units after a resume with N' where a resume ran with another thread count (resume.note_other_threads)."""
    counts = c.get("resumed_threads")
    return f"; units after a resume with {', '.join(map(str, counts))}" if counts else ""


def _processes(c: dict) -> list[str]:
    """The line on a distributed run's processes (none for a one-process run)."""
    world = c.get("world_size", 1)
    if world <= 1:
        return []
    backend = "NCCL" if str(c.get("device", "cpu")).startswith("cuda") else "gloo"
    sync = "; --sync-bn: every BN layer is a bnlab.SyncBatchNorm" if c.get("sync_bn") else ""
    return [f"- {world} processes (DistributedDataParallel over {backend}; rank 0 evaluates and writes this folder){sync}"]


def _how_it_was_made(folder: RunFolder, summary: dict, trains: bool) -> list[str]:
    c = folder.config
    versions = ", ".join(f"{k} {v}" for k, v in c.get("versions", {}).items() if v)
    data = c["dataset"] + (f" from {c['data_dir']}" if c.get("data_dir") else " (bundled 5,000-image subset)")
    version = f"- {'quick' if c['quick'] else 'full'} version"
    lines = [
        f"- command: `{c.get('command') or 'bnlab run ' + c['experiment']}`",
        f"- started {c.get('created')}; units finished: {len(summary['units_done'])} of {len(c['units'])}; "
        f"{'training ' if trains else ''}wall time {summary['wall_s']:.1f} s on {c.get('device')} "
        f"({_threads(c.get('torch_threads'))}{_resumed_threads(c)}, {c.get('machine')})",
        f"{version}; seeds {c['seeds']}; BatchNorm implementation: {c['bn']}; data: {data}" if trains else version,
        *_processes(c),
        f"- versions: {versions}; git commit: {c.get('git_commit') or 'none'}"
        + (f", resumed at {', '.join(c['resumed_with'])}" if c.get("resumed_with") else ""),
        *([f"- memory allocator: {c['allocator']}"] if c.get("allocator") else []),
        "- parameters: " + ", ".join(f"`{k}` = {_short(v)}" for k, v in c["params"].items()),
    ]
    return lines


def write_report(folder: RunFolder | str | Path) -> Path:
    """Draw the figures and write report.md in ``folder``; returns the report's path."""
    if not isinstance(folder, RunFolder):
        folder = RunFolder.open(folder)
    exp = get(folder.config["experiment"])
    summary = folder.write_summary()
    md = [f"# `{exp.name}`: {exp.summary}", ""]
    if not summary["complete"]:
        md += [f"> **Partial run**: {len(summary['units_done'])} of {len(folder.config['units'])} units finished. "
               f"Continue it with `bnlab run {exp.name} --resume --out {folder.path}`.", ""]
    # no finished unit (a run stopped before its first): nothing measured, which every experiment's
    # findings need not handle (the inference report's raised IndexError)
    measured = exp.findings(folder).strip() if summary["units_done"] else "Nothing yet: no unit has finished."
    md += [f"**The claim.** {exp.claim}", ""]
    if folder.config["quick"]:
        # a reviewer's reading of `bnlab run all --quick`: numbers that contradict the claim, no word why
        what = ("a few networks trained for a few steps, to try the command; too little to show the claim, and its "
                "numbers may contradict it" if exp.trains else
                "few, short samples per case, to try the command; on a busy machine a case can read far off "
                "(one read a 1,694x speed-up)")
        md += [f"> **Quick version**: {what}. Run `bnlab run {exp.name}` without `--quick` for the measurement "
               "(docs/experiments.md shows what the full run gives).", ""]
    md += ["## What was measured", "", measured, ""]
    figures = exp.figures(folder) if summary["rows"] else []
    if figures:
        md += ["## Figures", ""]
        for file, caption in figures:
            md += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    md += ["## How this run was made", "", *_how_it_was_made(folder, summary, exp.trains), "",
           "## Files", "",
           f"`summary.json` (key `rows`: one record per {'trained ' if exp.trains else ''}{exp.row_noun}) and `summary.csv`; "
           "`metrics.jsonl` (the curves); `config.json`; `units/` (one file per finished unit); "
           "the figures; this report (`bnlab report DIR` rebuilds figures and report from these files).", ""]
    path = folder.path / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
