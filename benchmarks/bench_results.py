"""Reading bench_bn.py's results files, for bench_bn.py's resume and plot_bench.py's figure.

A results file is JSON lines: a header (``{"environment": ..., "command": ...}``), then one line
per case (its key, ``results`` and ``ratios``); bench_bn.save writes it whole, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path


def read(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, cases): the header line ({} where there is none) and every case line, in file order.

    ValueError naming the file where it cannot be read ("cannot read PATH (...)") or holds a line
    that is not JSON ("line N of PATH is not JSON (...)"); the callers prefix their argument's name.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
    header: dict = {}
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number} of {path} is not JSON ({exc})") from None
        if "environment" in row:
            header = row
        elif "results" in row or "ratios" in row:  # bench_bn.py writes both
            cases.append(row)
    return header, cases
