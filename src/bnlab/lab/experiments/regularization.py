"""regularization: BN regularizes slightly and combines with dropout (seed 002).

An MLP 784–100×4–10 (ReLU, He init) trained to fit a small training set (500 images, batch 25,
100 epochs of plain SGD), in four versions — neither, BN, dropout (p = 0.2 after every hidden
ReLU), BN and dropout — at three learning rates. Seed 002 attributes BN's regularizing effect
to the noise of mini-batch statistics and calls it slight; the small batch keeps that noise
visible. Reported per network: final training and test accuracy, their gap, and training and
test cross-entropy (the test loss shows overfitting earlier than the accuracy does).
"""

from __future__ import annotations

import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves, flat_data, net_seed, per_net
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder, progress
from bnlab.lab.stacked import StackedMLP
from bnlab.lab.stacked_train import StackedTrainer
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread

_NAMES = {(False, False): "neither", (True, False): "BN", (False, True): "dropout", (True, True): "BN + dropout"}


def _params(quick: bool) -> dict:
    return {"sizes": [784, 100, 100, 100, 100, 10], "activation": "relu", "init": "he", "train_size": 500,
            "batch_size": 25, "learning_rates": [0.03, 0.1, 0.3], "dropout": 0.2, "epochs": 2 if quick else 100,
            "eval_every_epochs": 1 if quick else 5, "bn_momentum": 0.1, "bn_eps": 1e-5}


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seeds, bn = ctx.params, ctx.seeds, unit == "bn"
    x, y, x_test, y_test = flat_data(ctx, p["train_size"])
    configs = [(lr, d) for lr in p["learning_rates"] for d in (0.0, p["dropout"])]
    nets = [(seed, lr, d) for seed in seeds for lr, d in configs]
    net = StackedMLP(p["sizes"], [net_seed(s, i, bn) for s in seeds for i in range(len(configs))], groups=len(seeds),
                     activation=p["activation"], batchnorm=bn, bn_impl=ctx.bn, init=p["init"],
                     dropout=torch.tensor([d for _, _, d in nets]), momentum=p["bn_momentum"], eps=p["bn_eps"],
                     device=ctx.device)
    trainer = StackedTrainer(net, x, y, torch.tensor([lr for _, lr, _ in nets]), p["batch_size"],
                             group_seeds=list(seeds), dropout_seed=net_seed(seeds[0], 99, bn))
    metrics = []
    for epoch in progress(range(1, p["epochs"] + 1), desc=f"regularization {unit}"):
        for idx in trainer.epoch():
            trainer.step(idx)
        if epoch % p["eval_every_epochs"] and epoch != p["epochs"]:
            continue
        train_loss, train_acc = trainer.evaluate_train()
        test_loss, test_acc = trainer.evaluate(x_test, y_test)
        for (seed, lr, d), *vals in zip(nets, *map(per_net, (train_acc, test_acc, train_loss, test_loss))):
            metrics.append({"batchnorm": bn, "dropout": d, "lr": lr, "seed": seed, "epoch": epoch,
                            **dict(zip(("train_acc", "test_acc", "train_loss", "test_loss"), vals))})
    rows = []
    for g, (seed, lr, d) in enumerate(nets):
        last = metrics[-len(nets) + g]
        rows.append({"batchnorm": bn, "dropout": d, "lr": lr, "seed": seed, "train_acc": last["train_acc"],
                     "test_acc": last["test_acc"], "gap": last["train_acc"] - last["test_acc"],
                     "train_loss": last["train_loss"], "test_loss": last["test_loss"], "diverged": bool(trainer.diverged[g])})
    return {"rows": rows, "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, band, new_figure, save_figure

    rows, metrics, p = folder.rows(), folder.metrics(), folder.config["params"]
    lrs = p["learning_rates"]
    versions = [(False, False), (True, False), (False, True), (True, True)]
    colors = {(False, False): COLORS[False], (True, False): COLORS[True], (False, True): "#d62728", (True, True): "#2ca02c"}
    fig, axes = new_figure(1, 3, size=(13, 3.8))
    width = 0.2
    for k, (bn, drop) in enumerate(versions):
        d = p["dropout"] if drop else 0.0
        for ax, key in ((axes[0, 0], "test_acc"), (axes[0, 1], "test_loss")):
            stats = group_stats([r for r in rows if r["batchnorm"] == bn and r["dropout"] == d], ["lr"], key)
            pos = [lrs.index(s["lr"]) + (k - 1.5) * width for s in stats]
            ax.bar(pos, [s["mean"] for s in stats], width, color=colors[(bn, drop)], label=_NAMES[(bn, drop)],
                   yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]] if stats and stats[0]["n"] > 1 else None)
        lr = p["learning_rates"][len(lrs) // 2]
        epochs, runs = curves(metrics, {"batchnorm": bn, "dropout": d, "lr": lr}, "epoch", "test_loss")
        if len(epochs):
            band(axes[0, 2], epochs, runs, colors[(bn, drop)], _NAMES[(bn, drop)])
    for ax in axes[0, :2]:
        ax.set_xticks(range(len(lrs)), [f"lr {lr:g}" for lr in lrs])
    accs = [r["test_acc"] for r in rows if r["test_acc"] is not None]
    axes[0, 0].set(ylim=(max(0.0, min(accs) - 0.05) if accs else 0, 1.0), ylabel="final test accuracy", title="test accuracy")
    axes[0, 1].set(ylabel="final test cross-entropy", title="test loss (lower: less overfitting)")
    axes[0, 2].set(xlabel="epoch", ylabel="test cross-entropy", title=f"test loss during training, lr {lr:g}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, frameon=False)
    save_figure(fig, folder.path / "regularization.png")
    return [("regularization.png", "Final test accuracy and test loss of the four versions at three learning rates "
             "(bars: mean, whiskers: min–max over seeds), and the test loss during training at the middle learning rate.")]


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"{len(rows)} networks (4 versions × {len(p['learning_rates'])} learning rates × "
             f"{counted(len(seeds), 'seed')}), "
             f"each trained for {counted(p['epochs'], 'epoch')} on {p['train_size']} training images (batch {p['batch_size']}); "
             f"dropout p = {p['dropout']}. Mean ± std (min–max) over seeds:", ""]
    table = []
    for lr in p["learning_rates"]:
        for (bn, drop), name in _NAMES.items():
            d = p["dropout"] if drop else 0.0
            mine = [r for r in rows if r["lr"] == lr and r["batchnorm"] == bn and r["dropout"] == d]
            if mine:
                stat = lambda key: group_stats([{**r, "k": 0} for r in mine], ["k"], key)[0]  # noqa: E731
                table.append({"lr": lr, "name": name, "diverged": sum(bool(r.get("diverged")) for r in mine),
                              "runs": len(mine), **{k: stat(k) for k in ("train_acc", "test_acc", "gap", "test_loss")}})
    lines.append(markdown_table(table, [("lr", lambda r: f"{r['lr']:g}"), ("version", "name"),
                                        ("train accuracy", lambda r: mean_spread(r["train_acc"])),
                                        ("test accuracy", lambda r: mean_spread(r["test_acc"])),
                                        ("train − test", lambda r: mean_spread(r["gap"])),
                                        ("test loss", lambda r: mean_spread(r["test_loss"], as_pct=False)),
                                        ("diverged", lambda r: f"{r['diverged']}/{r['runs']}")]))
    best = {}
    for r in table:
        if r["name"] not in best or r["test_acc"]["mean"] > best[r["name"]]["test_acc"]["mean"]:
            best[r["name"]] = r
    compare = []
    for lr in p["learning_rates"]:
        pair = {r["name"]: r for r in table if r["lr"] == lr}
        if "BN" in pair and "neither" in pair:
            # a diverged network has an accuracy but no test loss: say when the losses compared are fewer
            partial = any(pair[v]["test_loss"]["n_finite"] < pair[v]["test_loss"]["n"] for v in ("BN", "neither"))
            compare.append((lr, pair["BN"]["test_acc"]["mean"] - pair["neither"]["test_acc"]["mean"],
                            pair["BN"]["test_loss"]["mean"] - pair["neither"]["test_loss"]["mean"],
                            " (the losses of the runs that did not diverge)" if partial else ""))
    if compare:
        lines += ["", "BN against neither, per learning rate (test accuracy in points, test loss): " + "; ".join(
            f"lr {lr:g}: {100 * da:+.1f} points, {dl:+.3f}{note}" for lr, da, dl, note in compare) + "."]
    lines += ["", "Best learning rate of each version: " + "; ".join(
        f"{name} {mean_spread(r['test_acc'])} at lr {r['lr']:g}" for name, r in best.items()) + "."]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="regularization",
    summary="train/test gap with BN, dropout, both, neither (MLP on 500 images, 3 learning rates)",
    runtime="full ~30 s with 3 seeds, quick ~1 s",
    claim="BN has a slight regularizing effect (the noise of mini-batch statistics), and it can be combined with "
          "dropout (seed 002).",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: ["bn", "plain"],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
