"""init-sweep: with BN, training works across a wide range of weight-init scales (seed 004).

The protocol of *Deep Learning from Scratch*, ch. 6 (seed 004): an MLP 784–100×5–10 with ReLU,
weights N(0, w²) for 16 scales w = logspace(0, −4, 16), biases 0, with BN after each hidden
affine layer or without; the first 1,000 training images, batch 100, SGD with lr 0.01, 20
epochs of 10 updates; training accuracy (eval mode) on those 1,000 images after each epoch,
and at the end the accuracy on 1,000 held-out images. Every seed changes both the initial
weights and the batch order; within a seed, the BN and plain nets see the same batches.

Departures from the book, all PyTorch conventions: BN eps 1e-5 (the book 1e-6: "10e-7"), running
variance unbiased and initialised to 1 (the book: biased, from 0), batches drawn without
replacement (each epoch is one pass over the 1,000 images); the bias before each BN is dropped.
All 32 networks of a seed, and all seeds, train at once (bnlab.lab.stacked).
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import (curves, decades, flat_data, learning_band, net_seed, per_net,
                                             row_grid)
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder, progress
from bnlab.lab.stacked import StackedMLP
from bnlab.lab.stacked_train import StackedTrainer
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread

SCALES = [float(w) for w in np.logspace(0, -4, 16)]


def _params(quick: bool) -> dict:
    return {"sizes": [784, 100, 100, 100, 100, 100, 10], "activation": "relu", "weight_init_stds": SCALES,
            "train_size": 1000, "test_size": 1000, "batch_size": 100, "lr": 0.01, "epochs": 3 if quick else 20,
            "bn_momentum": 0.1, "bn_eps": 1e-5, "first_layer": "auto"}


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seeds, bn = ctx.params, ctx.seeds, unit == "bn"
    x, y, x_test, y_test = flat_data(ctx, p["train_size"], p["test_size"])
    scales = p["weight_init_stds"]
    nets = [(seed, w) for seed in seeds for w in scales]  # network g = (seed, scale), grouped by seed
    net = StackedMLP(p["sizes"], [net_seed(s, i, bn) for s in seeds for i in range(len(scales))], groups=len(seeds),
                     activation=p["activation"], batchnorm=bn, bn_impl=ctx.bn, init=torch.tensor(scales * len(seeds)),
                     momentum=p["bn_momentum"], eps=p["bn_eps"], device=ctx.device)
    trainer = StackedTrainer(net, x, y, p["lr"], p["batch_size"], group_seeds=list(seeds), first_layer=p["first_layer"])
    metrics = []
    for epoch in progress(range(1, p["epochs"] + 1), desc=f"init-sweep {unit}"):
        batch_loss, steps = torch.zeros(len(nets), device=ctx.device), 0
        for idx in trainer.epoch():
            batch_loss += trainer.step(idx)[0]
            steps += 1
        loss, acc = trainer.evaluate_train()
        for (seed, w), a, l, bl in zip(nets, per_net(acc), per_net(loss), per_net(batch_loss / steps)):
            metrics.append({"batchnorm": bn, "seed": seed, "weight_init_std": w, "epoch": epoch,
                            "train_acc": a, "train_loss": l, "batch_loss": bl})
    test_loss, test_acc = trainer.evaluate(x_test, y_test)
    rows = []
    for g, ((seed, w), tl, ta) in enumerate(zip(nets, per_net(test_loss), per_net(test_acc))):
        last = metrics[-len(nets) + g]
        rows.append({"weight_init_std": w, "batchnorm": bn, "seed": seed, "train_acc": last["train_acc"],
                     "test_acc": ta, "train_loss": last["train_loss"], "test_loss": tl,
                     "diverged": bool(trainer.diverged[g]), "updates": trainer.steps})
    return {"rows": rows, "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, LABELS, band, new_figure, save_figure

    metrics, rows = folder.metrics(), folder.rows()
    scales = folder.config["params"]["weight_init_stds"]
    fig, axes = new_figure(4, 4, size=(10, 9), layout=None, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=0.93, wspace=0.08, hspace=0.28)
    for ax, w in zip(axes.flat, scales):
        for bn in (True, False):
            epochs, runs = curves(metrics, {"batchnorm": bn, "weight_init_std": w}, "epoch", "train_acc")
            if len(epochs):
                band(ax, epochs, runs, COLORS[bn], LABELS[bn], linestyle="-" if bn else "--")
        ax.set_title(f"w = {w:.2g}", pad=3)
        ax.set_ylim(0, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("train accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("Training accuracy per epoch for 16 weight-init scales w (mean and min–max over seeds)", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncols=2, frameon=False)
    save_figure(fig, folder.path / "init_sweep_grid.png")

    fig, axes = new_figure(1, 2, size=(9, 3.6), sharey=True)
    seeds = sorted({r["seed"] for r in rows})
    for ax, key, title in zip(axes[0], ("train_acc", "test_acc"), ("1,000 training images", "1,000 held-out images")):
        for bn in (True, False):
            arr = row_grid(rows, {"batchnorm": bn}, "weight_init_std", scales, key)
            band(ax, scales, arr, COLORS[bn], LABELS[bn], marker="o", markersize=3, linestyle="-" if bn else "--")
        ax.set_xscale("log")
        ax.set_xlabel("weight init std w")
        ax.set_title(f"final accuracy, {title}")
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=2, frameon=False)
    save_figure(fig, folder.path / "init_sweep_final.png")
    n = len(seeds)
    return [("init_sweep_final.png", "Final accuracy against the init scale w, with and without BN (mean and min–max "
                                     f"over {counted(n, 'seed')})."),
            ("init_sweep_grid.png", "Training accuracy per epoch, one panel per init scale (the book's figure 6-19).")]


def _band_words(band: tuple[float, float]) -> str:
    """Where a learning band lies: "only at w = 0.29" for one scale, else "for w from 0.0046 to
    0.29 (1.8 decades)"."""
    if band[0] == band[1]:
        return f"only at w = {band[0]:.2g}"
    return f"for w from {band[0]:.2g} to {band[1]:.2g} ({decades(band):.1f} decades)"


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    train = {bn: group_stats([r for r in rows if r["batchnorm"] == bn], ["weight_init_std"], "train_acc") for bn in (True, False)}
    test = {bn: group_stats([r for r in rows if r["batchnorm"] == bn], ["weight_init_std"], "test_acc") for bn in (True, False)}
    lines = [f"{len(rows)} networks ({len(p['weight_init_stds'])} init scales × with/without BN × "
             f"{counted(len(seeds), 'seed')}), each trained for "
             f"{counted(p['epochs'], 'epoch')} of {p['train_size'] // p['batch_size']} SGD updates (batch {p['batch_size']}, lr {p['lr']}) "
             f"on the first {p['train_size']} training images."]
    for thr in (0.9, 0.5):
        parts = []
        for bn in (True, False):
            stats = train[bn]
            band_ = learning_band([s["weight_init_std"] for s in stats], [s["mean"] for s in stats], thr)
            name = "with BN" if bn else "without BN"
            if not stats:  # a partial run: this condition has not trained yet
                parts.append(f"{name} no network has finished yet")
            elif band_ is None:
                parts.append(f"{name} no init scale reaches a mean final training accuracy of {thr:.0%}")
            else:
                parts.append(f"{name} the mean final training accuracy reaches {thr:.0%} {_band_words(band_)}")
        text = "; ".join(parts) + "."
        lines.append(text[0].upper() + text[1:])
    diverged = sum(1 for r in rows if r["diverged"])
    if diverged:
        lines.append(f"{counted(diverged, 'network')} diverged (non-finite loss; they then predict a single class).")
    def pick(stats: list[dict], w: float) -> dict | None:
        return next((s for s in stats if s["weight_init_std"] == w), None)

    table = [{"w": w, "bn_train": pick(train[True], w), "plain_train": pick(train[False], w),
              "bn_test": pick(test[True], w), "plain_test": pick(test[False], w)} for w in p["weight_init_stds"]]
    cell = lambda key: (lambda r: mean_spread(r[key]) if r[key] else "–")  # noqa: E731
    lines += ["", "Final accuracy, mean ± std (min–max) over seeds:", "",
              markdown_table(table, [("w", lambda r: f"{r['w']:.2g}"), ("train, BN", cell("bn_train")),
                                     ("train, no BN", cell("plain_train")), ("test, BN", cell("bn_test")),
                                     ("test, no BN", cell("plain_test"))])]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="init-sweep",
    summary="MLP 784-100x5-10, 16 weight-init scales, with vs without BN (the book's figure 6-19)",
    runtime="full ~20 s with 3 seeds (2 threads), quick ~2 s",
    claim="With BN a network learns from a wide range of initial weight scales, "
          "where the same network without BN learns only in a narrow band (seed 004, *Deep Learning from Scratch* §6.3).",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: ["bn", "plain"],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
