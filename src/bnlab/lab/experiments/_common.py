"""Helpers shared by the experiments: seeds, data on the device, curves from metrics, learning bands."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bnlab.lab.runner import RunContext

__all__ = ["net_seed", "flat_data", "per_net", "curves", "row_grid", "learning_band", "decades"]


def net_seed(seed: int, *parts: int) -> int:
    """A seed for one network from the run seed and the network's coordinates in the sweep."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def flat_data(ctx: RunContext, train_size: int | None = None, test_size: int | None = None):
    """(x_train (n, D), y_train, x_test, y_test) as flat float32 tensors on the run's device."""
    train, test = ctx.data
    if train_size is not None:
        train = train.take(train_size)
    if test_size is not None:
        test = test.take(test_size)
    d = ctx.device
    return train.flat().to(d), train.y.to(d), test.flat().to(d), test.y.to(d)


def data_words(config: dict) -> tuple[str, str]:
    """How a report names the training and test images of a run that used them whole: the bundled
    subset's sizes, or the folder of the full dataset (--data-dir), whose sizes the run does not keep."""
    if config.get("data_dir"):
        return f"the training images in {config['data_dir']}", "its test images"
    from bnlab.lab.data import BUNDLED_TEST_SIZE, bundled_mnist_size

    total = bundled_mnist_size()
    return f"the {total - BUNDLED_TEST_SIZE:,} training images", f"the {BUNDLED_TEST_SIZE:,} test images"


def per_net(values: Tensor) -> list[float]:
    """A (G,) tensor as a list of Python floats (NaN for non-finite values)."""
    return [float(v) if math.isfinite(float(v)) else math.nan for v in values.detach().cpu()]


def curves(metrics: list[dict], match: dict, x_key: str, y_key: str, run_key: str = "seed"):
    """Curves of ``y_key`` against ``x_key`` for the metric records matching ``match``, one per run.

    Returns:
        (x values (T,), array (R, T)) with NaN where a run has no value at some x.
    """
    selected = [m for m in metrics if all(m.get(k) == v for k, v in match.items())]
    xs = sorted({m[x_key] for m in selected})
    runs = sorted({m[run_key] for m in selected})
    arr = np.full((len(runs), len(xs)), np.nan)
    col = {x: i for i, x in enumerate(xs)}
    row = {r: i for i, r in enumerate(runs)}
    for m in selected:
        v = m.get(y_key)
        arr[row[m[run_key]], col[m[x_key]]] = np.nan if v is None else v
    return np.asarray(xs), arr


def row_grid(rows: list[dict], match: dict, x_key: str, xs: list, y_key: str, run_key: str = "seed") -> np.ndarray:
    """Array (R, len(xs)) of ``y_key`` from the rows matching ``match``: one line per run, one column per x.

    Missing rows and None values (e.g. a diverged network) are NaN.
    """
    selected = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    runs = sorted({r[run_key] for r in selected})
    arr = np.full((len(runs), len(xs)), np.nan)
    for r in selected:
        if r.get(x_key) in xs and r.get(y_key) is not None:
            arr[runs.index(r[run_key]), xs.index(r[x_key])] = r[y_key]
    return arr


def learning_band(xs: list[float], values: list[float], threshold: float) -> tuple[float, float] | None:
    """The smallest and largest x of the longest run of consecutive xs (in their order) whose value
    reaches ``threshold`` (the first such run where several are as long), or None if none does: a
    scale that fails between two that pass ends the band, which the smallest and largest passing x
    alone would have stretched over it."""
    runs, current = [], []
    for x, v in zip(xs, values):
        if v is not None and not math.isnan(v) and v >= threshold:
            current.append(x)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    if not runs:
        return None
    longest = max(runs, key=len)
    return min(longest), max(longest)


def decades(band: tuple[float, float] | None) -> float:
    """log10(max / min) of a band of positive values; 0 for None."""
    return 0.0 if band is None else math.log10(band[1] / band[0])
