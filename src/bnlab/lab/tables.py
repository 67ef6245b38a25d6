"""Small helpers to aggregate result rows over seeds and print them as Markdown tables."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

__all__ = ["group_stats", "markdown_table", "fmt", "counted", "with_middle", "pct", "mean_spread"]


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def group_stats(rows: list[dict], keys: Sequence[str], metric: str) -> list[dict]:
    """Aggregate ``metric`` over the rows sharing the values of ``keys`` (typically: over seeds).

    Returns one record per group, in order of first appearance, with the key values and
    ``mean``, ``std`` (population), ``min``, ``max`` over the finite values, ``n`` (rows in the
    group) and ``n_finite``. Missing or non-finite values (a diverged run) count in ``n`` only.
    """
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row.get(metric))
    out = []
    for key, values in groups.items():
        vals = _finite(values)
        m = sum(vals) / len(vals) if vals else math.nan
        std = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)) if vals else math.nan
        out.append({**dict(zip(keys, key)), "mean": m, "std": std, "min": min(vals, default=math.nan),
                    "max": max(vals, default=math.nan), "n": len(values), "n_finite": len(vals)})
    return out


def fmt(value: Any, digits: int = 3) -> str:
    """A compact string for a table cell: floats to ``digits`` significant digits, None and NaN as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def counted(n: int, noun: str) -> str:
    """n with the noun in the number it takes: 1 epoch, 2 epochs (an English plural in -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def with_middle(value: float, middle: Sequence[float] | None, unit: str = "", spec: str = ".2f") -> str:
    """A ratio, then in brackets the middle half of its per-round readings where there is one:
    "2.24x (2.17-2.60)" (the speed report's and bench_bn.py's tables; ``spec`` formats the figures)."""
    text = f"{value:{spec}}{unit}"
    return f"{text} ({middle[0]:{spec}}-{middle[1]:{spec}})" if middle else text


def pct(value: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage, e.g. 0.9731 -> '97.3 %'; None/NaN as '–'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * float(value):.{digits}f} %"


def mean_spread(stats: dict, as_pct: bool = True) -> str:
    """'mean ± std (min–max)' of a group_stats record; percentages by default. Where some runs of the
    group have no value (a diverged network, a target never reached), the figures are over the others,
    and the cell says how many: '…, 2 of 3 runs'."""
    if stats["n_finite"] == 0:
        return "–"
    f = (lambda v: f"{100 * v:.1f}") if as_pct else (lambda v: f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")
    unit = " %" if as_pct else ""
    of = f", {stats['n_finite']} of {stats['n']} runs" if stats["n_finite"] < stats["n"] else ""
    if stats["n_finite"] == 1:
        return f"{f(stats['mean'])}{unit}{of}"
    return f"{f(stats['mean'])} ± {f(stats['std'])}{unit} ({f(stats['min'])}–{f(stats['max'])}){of}"


def markdown_table(records: list[dict], columns: Sequence[tuple[str, str | Callable[[dict], str]]]) -> str:
    """A Markdown table: ``columns`` are (header, key or function of the record) pairs."""
    header = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for rec in records:
        cells = [(get(rec) if callable(get) else fmt(rec.get(get))) for _, get in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
