"""Figure helpers: matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).

Imported only when a figure is drawn, so the lab's other modules (and the library) never
import matplotlib.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bnlab.lab.runs import new_file_mode

__all__ = ["new_figure", "save_figure", "band", "empty_note", "COLORS", "LABELS"]

#: one colour per kind of network, the same in every figure of the lab.
COLORS = {True: "#1f77b4", False: "#ff7f0e", "bn": "#1f77b4", "plain": "#ff7f0e",
          "channel": "#1f77b4", "activation": "#2ca02c", "none": "#ff7f0e"}
LABELS = {True: "with BN", False: "without BN"}

_RC = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9,
       "xtick.labelsize": 9, "ytick.labelsize": 9}


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.0), layout: str | None = "constrained",
               **kwargs):
    """A (figure, axes array) pair on an Agg canvas; axes is always a 2-D array (nrows, ncols).

    ``layout=None`` skips matplotlib's layout solver (slow for many panels); place the axes with
    ``fig.subplots_adjust`` instead.
    """
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=size, layout=layout)
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save as PNG atomically (temporary file, then rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def band(ax, x: Sequence[float], runs: np.ndarray, color: str, label: str | None = None, **line_kwargs) -> None:
    """Plot the mean over runs (axis 0 of ``runs``, shape (R, len(x))) with a shaded min–max band.

    NaN entries (e.g. a diverged run) are ignored; a column with no finite value is not drawn.
    """
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    if runs.shape[0] == 0:  # a condition with no finished run yet (a partial run's report)
        return
    finite = np.isfinite(runs)
    count = finite.sum(0)
    safe = np.where(finite, runs, 0.0)
    mean = np.where(count > 0, safe.sum(0) / np.maximum(count, 1), np.nan)
    lo = np.where(count > 0, np.where(finite, runs, np.inf).min(0), np.nan)
    hi = np.where(count > 0, np.where(finite, runs, -np.inf).max(0), np.nan)
    ax.plot(x, mean, color=color, label=label, **line_kwargs)
    if runs.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def empty_note(ax, text: str) -> None:
    """Say inside a panel why it shows nothing (in a quick run, say, no network reaches the
    accuracy the panel zooms to or counts steps to), rather than leave a blank frame."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#555555", wrap=True)
