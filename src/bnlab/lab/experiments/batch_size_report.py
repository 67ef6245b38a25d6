"""Figures and findings of the batch-size experiment, from its run folder alone."""

from __future__ import annotations

import math

import numpy as np

from bnlab.lab.experiments._common import row_grid
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import counted, group_stats, markdown_table

#: the methods of the main figure, in legend order; "ghost-control" is the control of the second figure.
METHODS = ("bn", "bn-recal", "ghost", "renorm", "gn", "none")
COLORS = {"bn": "#1f77b4", "bn-recal": "#17becf", "ghost": "#9467bd", "ghost-control": "#8c564b",
          "renorm": "#2ca02c", "gn": "#d62728", "none": "#ff7f0e"}
#: where each BN layer sits: (name in the model, values per channel in a batch of one sample).
LAYERS = (("norms.0", 196, "conv1, 14×14"), ("norms.1", 49, "conv2, 7×7"), ("norms.2", 1, "conv3, 1×1"))


def label(norm: str, p: dict) -> str:
    """The legend name of a normalization."""
    return {"bn": "BN", "bn-recal": "BN + bnlab.recalibrate", "ghost": f"Ghost BN (k = {p['ghost_k']})",
            "ghost-control": f"Ghost BN (k = {p['control_k']}), control", "renorm": "Batch Renorm",
            "gn": "GroupNorm", "none": "no normalization"}[norm]


def _grid(rows: list[dict], norm: str, sizes: list[int], key: str = "test_acc") -> np.ndarray:
    return row_grid(rows, {"norm": norm}, "batch_size", sizes, key)


def _mean(arr: np.ndarray) -> np.ndarray:
    """Column means over seeds, NaN where a column has no finite value."""
    finite = np.isfinite(arr)
    total = np.where(finite, arr, 0.0).sum(0)
    return np.where(finite.any(0), total / np.maximum(finite.sum(0), 1), np.nan)


def _log2_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()


def figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import band, empty_note, new_figure, save_figure

    rows, p = folder.rows(), folder.config["params"]
    sizes = sorted({r["batch_size"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    spread = " (line: mean, band: min–max over seeds)" if len(seeds) > 1 else ""

    fig, axes = new_figure(1, 2, size=(11, 4.2))
    for ax in axes[0]:
        for norm in METHODS:
            arr = _grid(rows, norm, sizes)
            if np.isfinite(arr).any():
                band(ax, sizes, arr, COLORS[norm], label(norm, p), marker="o", markersize=3,
                     linestyle="--" if norm == "bn-recal" else "-")
        _log2_axis(ax, sizes)
        ax.set_xlabel("batch size per step (log scale)")
    axes[0, 0].set(ylabel="test accuracy (eval mode)", ylim=(0, 1.0), title="test accuracy against batch size")
    accs = [r["test_acc"] for r in rows if r["norm"] in METHODS and r["batch_size"] >= 4 and r.get("test_acc") is not None]
    low = max(0.8, math.floor(20 * min(accs)) / 20) if accs else 0.9
    axes[0, 1].set(ylim=(low, 1.0), title=f"the same, zoomed to {100 * low:.0f}–100 %")
    if not accs or max(accs) < low:
        empty_note(axes[0, 1], f"no network reached {100 * low:.0f} % in this run")
    axes[0, 0].legend(loc="lower right")
    save_figure(fig, folder.path / "batch_size.png")
    out = [("batch_size.png", f"Test accuracy of the small CNN against the per-step batch size for each normalization"
            f"{spread}; BN + recalibrate is the BN networks after bnlab.recalibrate; Ghost BN is drawn where the batch "
            f"exceeds its k = {p['ghost_k']} (below, it is BN).")]

    fig, axes = new_figure(1, 3, size=(15, 4.2))
    ax = axes[0, 0]
    for key, norm, name, style in (("test_acc", "bn", "eval mode (running statistics)", "-"),
                                   ("test_acc", "bn-recal", "eval mode after bnlab.recalibrate", "--"),
                                   ("test_acc_batch_stats", "bn", "train mode (statistics of each test batch of B)", ":")):
        arr = _grid(rows, norm, sizes, key)
        if np.isfinite(arr).any():
            band(ax, sizes, arr, COLORS[norm], name, marker="o", markersize=3, linestyle=style)
    _log2_axis(ax, sizes)
    ax.set(xlabel="batch size per step", ylabel="BN network's test accuracy", ylim=(0, 1.0),
           title="(a) BN: evaluation mode against training mode")
    ax.legend(loc="lower right")

    ax = axes[0, 1]
    diag = [r for r in folder.table("diagnose") if r["norm"] == "bn"] if "diagnose" in folder.table_names() else []
    for (layer, per_sample, name), marker, color in zip(LAYERS, ("s", "^", "o"), ("#9ecae1", "#4292c6", "#08306b")):
        arr = row_grid(diag, {"layer": layer}, "batch_size", sizes, "gap")
        if np.isfinite(arr).any():
            band(ax, [b * per_sample for b in sizes], arr, color, f"{name}: {per_sample}·B values" if per_sample > 1
                 else f"{name}: B values", marker=marker, markersize=4)
    ax.set(xscale="log", yscale="log", xlabel="values per channel in one batch (B·H·W)",
           ylabel="‖y_eval − y_train‖ / ‖y_train − β‖",
           title="(b) bnlab.diagnose on BN's layers: train/eval output gap")
    ax.legend(loc="upper right")

    ax = axes[0, 2]
    for norm, style in (("bn", "-"), ("ghost-control", "-")):
        arr = _grid(rows, norm, sizes)
        if np.isfinite(arr).any():
            band(ax, sizes, arr, COLORS[norm], label(norm, p), marker="o", markersize=3, linestyle=style)
    k = p["control_k"]
    bn_k = _grid(rows, "bn", sizes)[:, sizes.index(k)] if k in sizes else np.array([])
    if np.isfinite(bn_k).any():
        ax.axhline(float(np.nanmean(bn_k)), color=COLORS["bn"], linestyle=":", label=f"BN at B = {k}")
    _log2_axis(ax, sizes)
    ax.set(xlabel="batch size per step", ylabel="test accuracy (eval mode)", ylim=(0, 1.0),
           title=f"(c) statistics of {p['control_k']} samples inside large steps")
    ax.legend(loc="lower right")
    save_figure(fig, folder.path / "batch_size_why.png")
    out.append(("batch_size_why.png", "Why BN breaks. (a) The BN networks' test accuracy in evaluation mode (running "
                "statistics), after recalibration, and in training mode (each test batch of B normalized with its own "
                "statistics, as in training). (b) bnlab.diagnose's train/eval output gap of each BN layer before "
                "recalibration, against the number of values per channel the layer's statistics come from (B·H·W). "
                f"(c) Ghost BN with k = {p['control_k']} at every step batch: the optimizer sees large batches, the "
                f"statistics come from {p['control_k']} samples{spread}."))
    return out


def _pct(stats: dict) -> str:
    if stats["n_finite"] == 0:
        return "–"
    if stats["n_finite"] == 1:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _mean_of(rows: list[dict], norm: str, b: int, key: str = "test_acc") -> float:
    vals = [r[key] for r in rows if r["norm"] == norm and r["batch_size"] == b and r.get(key) is not None]
    return float(np.mean(vals)) if vals else math.nan


def findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    sizes = sorted({r["batch_size"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    norms = [n for n in (*METHODS, "ghost-control") if any(r["norm"] == n for r in rows)]
    stats = {(s["norm"], s["batch_size"]): s for s in group_stats(rows, ["norm", "batch_size"], "test_acc")}
    table = [{"norm": n, **{b: stats.get((n, b)) for b in sizes}} for n in norms]
    columns = [("normalization", lambda r: label(r["norm"], p))]
    columns += [(f"B = {b}", lambda r, b=b: _pct(r[b]) if r[b] else "=BN" if r["norm"].startswith("ghost") else "–")
                for b in sizes]
    lines = [f"{len(rows)} rows: {len([r for r in rows if r['norm'] != 'bn-recal'])} trained networks "
             f"({counted(len(seeds), 'seed')}) plus the BN networks again after `bnlab.recalibrate`. Small CNN on "
             f"{p['train_size']} training images ({p['image_size']}×{p['image_size']}), {counted(p['epochs'], 'epoch')} but at least "
             f"{p['min_steps']} steps, lr = {p['lr_base']}·B/{p['lr_ref_batch']} capped at {p['lr_cap']}, "
             f"linear decay to 0. Test accuracy (%, eval mode, {p['test_size']} test images, mean ± std over seeds):", "",
             markdown_table(table, columns), ""]
    bn, gn = {b: _mean_of(rows, "bn", b) for b in sizes}, {b: _mean_of(rows, "gn", b) for b in sizes}
    # only where both trained (a partial run's report: NaN compares False, which had read as "never below")
    both = [b for b in sizes if not math.isnan(bn[b]) and not math.isnan(gn[b])]
    below = [b for b in both if bn[b] < gn[b] - 0.01]
    if not both:
        lines.append("- BN against GroupNorm: no batch size where both have finished yet.")
    elif below:
        lines.append(f"- BN is more than 1 point below GroupNorm at B = {', '.join(map(str, below))} "
                     f"(at B = {below[0]}: BN {100 * bn[below[0]]:.1f} %, GroupNorm {100 * gn[below[0]]:.1f} %).")
    else:
        at = "" if len(both) == len(sizes) else f" (at B = {', '.join(map(str, both))}, where both have finished)"
        lines.append(f"- BN is never more than 1 point below GroupNorm{at}.")
    gaps = {b: _mean_of(rows, "bn", b, "eval_minus_batch_stats") for b in sizes}
    lines.append("- BN's test accuracy in eval mode minus in train mode (each test batch of B normalized with its own "
                 "statistics), points: " + ", ".join(f"B = {b}: {100 * gaps[b]:+.1f}" for b in sizes) + ".")
    gains = {n: {b: _mean_of(rows, n, b) - bn[b] for b in sizes} for n in ("bn-recal", "renorm", "ghost")}
    for n, what in (("bn-recal", "Recalibration"), ("renorm", "Batch Renorm"), ("ghost", "Ghost BN")):
        measured = [(b, g) for b, g in gains[n].items() if not math.isnan(g)]
        if measured:
            lines.append(f"- {what} against BN at the same B, points: " +
                         ", ".join(f"B = {b}: {100 * g:+.1f}" for b, g in measured) + ".")
    control = {b: _mean_of(rows, "ghost-control", b) for b in sizes}
    control = {b: v for b, v in control.items() if not math.isnan(v)}
    if control:
        k = p["control_k"]
        ref = f"BN at B = {k}: {100 * bn[k]:.1f} %, " if k in bn else ""
        lines.append(f"- The control (statistics of {k} samples inside steps of B) ranges over "
                     f"{100 * min(control.values()):.1f}–{100 * max(control.values()):.1f} % for B = {min(control)}–"
                     f"{max(control)} ({ref}BN at B = {sizes[-1]}: {100 * bn[sizes[-1]]:.1f} %).")
    diag = [r for r in folder.table("diagnose") if r["norm"] == "bn"] if "diagnose" in folder.table_names() else []
    if diag:
        dstats = {(s["layer"], s["batch_size"]): s for s in group_stats(diag, ["layer", "batch_size"], "gap")}
        noise = {(s["layer"], s["batch_size"]): s for s in group_stats(diag, ["layer", "batch_size"], "batch_noise")}
        lines += ["", "`bnlab.diagnose` on the BN networks before recalibration, on training batches of B: train/eval "
                  "output gap, and in parentheses the RMS scatter of batch means around the population mean (in σ), "
                  "mean over seeds:", "",
                  markdown_table([{"layer": name, **{b: (dstats.get((layer, b)), noise.get((layer, b))) for b in sizes}}
                                  for layer, _, name in LAYERS],
                                 [("layer", "layer")] + [(f"B = {b}", lambda r, b=b: "–" if r[b][0] is None else
                                                          f"{r[b][0]['mean']:.2f} ({r[b][1]['mean']:.2f})") for b in sizes])]
        advice = sorted({r["advice"] for r in diag if r["batch_size"] == sizes[0] and r["layer"] == LAYERS[-1][0]})
        if advice:
            lines += ["", f"Its advice for the 1×1 layer at B = {sizes[0]}: " + " / ".join(f"“{a}”" for a in advice) + "."]
        ctrl = [r for r in folder.table("diagnose") if r["norm"] == "ghost-control" and r["layer"] == LAYERS[-1][0]]
        if ctrl:
            b = max(r["batch_size"] for r in ctrl)
            gap = np.mean([r["gap"] for r in ctrl if r["batch_size"] == b])
            lines.append(f"On the control at B = {b} it reports a gap of {gap:.2f} for the 1×1 layer (its ghost batches "
                         f"of {p['control_k']} are the batches).")
    return "\n".join(lines)
