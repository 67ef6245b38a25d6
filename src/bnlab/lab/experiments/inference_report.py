"""Figures and findings of the inference experiment, from its run folder alone."""

from __future__ import annotations

import numpy as np

from bnlab.lab.experiments._common import data_words
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread


def figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, band, new_figure, save_figure

    batch_rows, stat_rows = folder.table("batch_stats"), folder.table("running_stats")
    sizes = sorted({r["batch_size"] for r in batch_rows})
    seeds = sorted({r["seed"] for r in batch_rows})
    fig, axes = new_figure(1, 2, size=(11, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0, 0]
    arr = np.array([[next(r["test_acc"] for r in batch_rows if r["seed"] == s and r["batch_size"] == b) for b in sizes]
                    for s in seeds])
    band(ax, sizes, arr, COLORS[True], "batch statistics of the test batch", marker="o", markersize=3)
    for source, style in (("momentum 0.1", "--"), ("population", ":")):
        vals = [r["test_acc"] for r in stat_rows if r["source"] == source]
        if vals:
            ax.axhline(float(np.mean(vals)), color="gray", linestyle=style, label=f"eval mode, {source} statistics")
    ax.set(xscale="log", xlabel="test batch size", ylabel="test accuracy", ylim=(0, 1.02),
           title="(a) normalizing each test batch with its own statistics")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.legend(loc="lower right")

    ax = axes[0, 1]
    sources = list(dict.fromkeys(r["source"] for r in stat_rows))
    stats = group_stats(stat_rows, ["source"], "test_acc")
    means = [next(s["mean"] for s in stats if s["source"] == src) for src in sources]
    lo = [m - next(s["min"] for s in stats if s["source"] == src) for m, src in zip(means, sources)]
    hi = [next(s["max"] for s in stats if s["source"] == src) - m for m, src in zip(means, sources)]
    colors = [COLORS["activation"] if s in ("cumulative", "population") else COLORS[True] for s in sources]
    ax.barh(range(len(sources)), means, xerr=[lo, hi] if len(seeds) > 1 else None, color=colors, alpha=0.8)
    for i, m in enumerate(means):
        ax.text(0.02, i, f"{100 * m:.1f} %", va="center", color="white", fontsize=9, fontweight="bold")
    ax.set_yticks(range(len(sources)), sources)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.0), xlabel="test accuracy (eval mode)", title="(b) running averages vs population statistics")
    save_figure(fig, folder.path / "inference.png")
    return [("inference.png", f"(a) Test accuracy when each test batch is normalized with its own statistics, against "
             f"the batch size; (b) eval-mode test accuracy with the statistics kept by running averages of several "
             f"momenta, the cumulative average, and population statistics recomputed after training "
             f"(mean{' and min–max' if len(seeds) > 1 else ''} over {counted(len(seeds), 'seed')}).")]


def findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    batch_rows, stat_rows = folder.table("batch_stats"), folder.table("running_stats")
    bn_rows = [r for r in rows if r["batchnorm"]]
    seeds = sorted({r["seed"] for r in rows})
    g = lambda rs, key: group_stats([{**r, "k": 0} for r in rs], ["k"], key)[0]  # noqa: E731
    error = next((r.get("batch1_error") for r in bn_rows if r.get("batch1_error")), None)
    train_words, test_words = data_words(folder.config)
    lines = [f"Per seed ({counted(len(seeds), 'seed')}) one BN network and one plain network were trained for "
             f"{p['steps']} SGD "
             f"steps (batch {p['batch_size']}, lr {p['lr']}) on {train_words}; accuracies are on {test_words} "
             "(mean ± std (min–max) over seeds).", ""]
    by_size = group_stats(batch_rows, ["batch_size"], "test_acc")
    columns = [("test batch size", "batch_size"), ("test accuracy", mean_spread)]
    scored = {r["batch_size"]: r["images"] for r in batch_rows if "images" in r}  # (not in folders before it was kept)
    if scored:
        columns.append(("images scored", lambda r: str(scored.get(r["batch_size"], "–"))))
    lines += ["**(a) Batch statistics at test time.** Each test batch normalized with its own mean and variance"
              + (" (whole batches only: a last, smaller batch is left out, so fewer images are scored where the batch "
                 "size does not divide the test set):" if scored else ":"), "",
              markdown_table(by_size, columns), ""]
    if error:
        lines += [f"At batch size 1 the library refuses to normalize (`{error}`); the number shown is what the formula "
                  "gives: x − mean = 0, so every BN layer outputs β and the network predicts one class for every image.", ""]
    by_source = group_stats(stat_rows, ["source"], "test_acc")
    lines += ["**(b–d) Fixed statistics (eval mode).** Running averages kept during training with each momentum "
              "(PyTorch's convention: the weight of the new batch; 0.1 is the default the network itself used), the "
              "cumulative average over all training batches, and population statistics recomputed after training over "
              "the training set:", "",
              markdown_table(by_source, [("statistics", "source"), ("test accuracy", mean_spread)]), ""]
    lines += ["**Train mode against eval mode.** Accuracy of the same BN network with batch statistics of "
              f"{p['batch_size']}-image batches (train mode) and with its running statistics (eval mode):", "",
              markdown_table([{"set": "training images", "train": g(bn_rows, "train_acc_train_mode"), "eval": g(bn_rows, "train_acc")},
                              {"set": "test images", "train": g(bn_rows, "test_acc_train_mode"), "eval": g(bn_rows, "test_acc")}],
                             [("images", "set"), ("train mode", lambda r: mean_spread(r["train"])),
                              ("eval mode", lambda r: mean_spread(r["eval"]))]), ""]
    plain_rows = [r for r in rows if not r["batchnorm"]]
    lines += ["**BN network against plain network** (seed 003's second step): test accuracy "
              f"{mean_spread(g(bn_rows, 'test_acc'))} with BN and {mean_spread(g(plain_rows, 'test_acc'))} without; "
              f"their predicted classes agree on {mean_spread(g(bn_rows, 'agreement_with_plain'))} of the test images, "
              f"and the total variation distance between their softmax outputs averages "
              f"{mean_spread(g(bn_rows, 'tv_distance_to_plain'), as_pct=False)} (0: identical, 1: disjoint)."]
    return "\n".join(lines)
