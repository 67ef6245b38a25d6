"""The figure of a speed comparison: bnlab against torch.nn and against a copy, case by case.

What it shows (README, docs/benchmarks.md, the lab's ``speed`` report): how many times faster than
torch.nn's BatchNorm bnlab is in each case, and what fraction of a copy's bandwidth it reaches. One
row of panels per mode (training forward, forward+backward, eval): on the left bnlab's speed over
torch.nn eager (log scale, 1 = as fast), on the right bnlab's time as a fraction of ``copy_`` (a
copy of the same bytes into a buffer allocated once; issue 5's targets drawn as lines: 0.9 for eval
on the CPU, 0.85 on a GPU for tensors of 200 MB or more). Bars are coloured by dtype and hatched
for channels-last; the machine, thread count (or the GPU) and torch version go in the title.
Drawn by benchmarks/plot_bench.py from bench_bn.py's files and by the ``speed`` experiment from its
run folder; nothing is measured here.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter

from bnlab.lab.plotting import new_figure

__all__ = ["MODE_TITLES", "DTYPE_COLORS", "EVAL_TARGET", "GPU_TARGET", "case_label", "figure"]

MODE_TITLES = {"fwd": "training forward", "fwdbwd": "training forward + backward", "eval": "eval",
               "frozen_fwdbwd": "frozen BN, forward + backward", "relu_fwdbwd": "BN + ReLU, forward + backward",
               "addrelu_fwdbwd": "BN + add + ReLU, forward + backward"}  # fmt: skip
DTYPE_COLORS = {"fp32": "#1f77b4", "bf16": "#ff7f0e", "fp16": "#2ca02c", "fp64": "#7f7f7f"}
#: the issue's bandwidth targets (fractions of a copy's): on the CPU for eval, on a GPU for every
#: mode at tensors of 200 MB or more
EVAL_TARGET = 0.9
GPU_TARGET = 0.85


def case_label(case: dict) -> str:
    """'(32, 64, 56, 56) cl' style: the shape and, for channels-last, the layout."""
    dims = case.get("shape_dims") or case["shape"]
    shape = "(" + ", ".join(str(d) for d in dims) + ")" if isinstance(dims, list) else str(dims)
    return shape + (" cl" if case["layout"] == "cl" else "")


def _minor_label(value: float, _position=None) -> str:
    """'2x', '3x', '5x' (and 20x, 30x, ...) on a log axis; the other minor ticks unlabelled."""
    leading = f"{value:.0e}"[0]
    return f"{value:g}x" if leading in "235" else ""


def _target(mode: str, gpu: bool) -> tuple[float, str] | None:
    """(fraction of copy, label) of the issue's bandwidth target for a mode's panel, or None."""
    if gpu:
        return GPU_TARGET, f"target {GPU_TARGET:g} (200 MB or more)"
    return (EVAL_TARGET, f"target {EVAL_TARGET:g}") if mode == "eval" else None


def figure(env: dict, cases: list[dict]):
    """The figure (matplotlib Figure): a row per mode present, in MODE_TITLES' order; in each row
    one bar per case of that mode for bnlab/torch.nn and one for bnlab's fraction of copy_."""
    modes = [m for m in MODE_TITLES if any(c["mode"] == m for c in cases)]
    gpu = any(c.get("device") == "cuda" for c in cases)
    per_mode = {m: [c for c in cases if c["mode"] == m] for m in modes}
    widest = max(len(v) for v in per_mode.values())
    # 3.1 in a row, but at most 12.6 in all (five modes: the fused layer's two with the three), so
    # that the figure stays within a screen's height (tests/lab: at most 1,400 pixels)
    width = max(9.0, 0.64 * widest + 3)
    fig, axes = new_figure(len(modes), 2, size=(width, min(3.1 * len(modes), 12.6)))
    # a panel's title on two lines where one would run into its neighbour's (a few cases per mode)
    joint = ":\n" if width < 13 else ": "
    for row, mode in enumerate(modes):
        rows = per_mode[mode]
        x = np.arange(len(rows))
        labels = [f"{case_label(c)} {c['dtype']}" for c in rows]
        colors = [DTYPE_COLORS.get(c["dtype"], "#7f7f7f") for c in rows]
        hatches = ["//" if c["layout"] == "cl" else "" for c in rows]
        speed = [c["ratios"]["bnlab_vs_torch"] for c in rows]
        of_copy = [c["ratios"].get("bnlab_fraction_of_copy_", np.nan) for c in rows]
        for ax, values, what in ((axes[row, 0], speed, "x torch.nn eager"), (axes[row, 1], of_copy, "of copy_")):
            bars = ax.bar(x, values, color=colors, edgecolor="black", linewidth=0.4)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
            ax.set_xticks(x, labels, rotation=70, ha="right", fontsize=7)
            ax.set_title(f"{MODE_TITLES[mode]}{joint}bnlab {what}", fontsize=10)
        axes[row, 0].set_yscale("log")
        axes[row, 0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))  # 10x, not 10^1
        axes[row, 0].yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        axes[row, 0].axhline(1.0, color="black", linewidth=0.8)
        axes[row, 0].set_ylabel("speed-up (log)")
        target = _target(mode, gpu)
        if target is not None:
            axes[row, 1].axhline(target[0], color="red", linewidth=0.8, linestyle="--", label=target[1])
            axes[row, 1].legend(loc="upper right", fontsize=7)
        axes[row, 1].set_ylabel("fraction of copy_")
    environment = env.get("environment", {})
    if gpu:
        machine = environment.get("gpu", "a GPU")
    else:
        threads = sorted({c.get("threads") for c in cases} - {None})
        machine = (f"{environment.get('cpu_id') or environment.get('cpu', 'unknown CPU')}, "
                   f"{'/'.join(str(t) for t in threads) or '?'} thread(s)")  # fmt: skip
    fig.suptitle(f"bnlab vs torch.nn BatchNorm: {machine}, torch {environment.get('torch', '?')} "
                 "(blue fp32, orange bf16; hatched: channels-last)", fontsize=9)  # fmt: skip
    return fig
