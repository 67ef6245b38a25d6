"""lr-sweep: BN trains at learning rates where the plain network diverges, and converges faster (seed 000).

The BN paper's MNIST network (Ioffe & Szegedy 2015, §4.1): 784–100–100–100–10 with sigmoid
activations, weights N(0, 1/fan_in), batch 60, plain SGD for a fixed number of steps, over a
logarithmic range of learning rates, with BN before each sigmoid or without. Every 50 steps the
test accuracy on the 1,000 held-out images is measured.

A network *diverged* if its training loss became non-finite, or if its mean training loss over
the last 10 % of the steps is higher than its loss at the first step (before any update):
training made it worse. ``steps_to_90`` is the first evaluation step at which the test accuracy
reached 90 % (missing if never).
"""

from __future__ import annotations

import math

import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves, flat_data, net_seed, per_net, row_grid
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder, progress
from bnlab.lab.stacked import StackedMLP
from bnlab.lab.stacked_train import StackedTrainer
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread

LEARNING_RATES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]


def _params(quick: bool) -> dict:
    return {"sizes": [784, 100, 100, 100, 10], "activation": "sigmoid", "init": "lecun", "learning_rates": LEARNING_RATES,
            "batch_size": 60, "steps": 100 if quick else 1500, "eval_every": 50, "target_acc": 0.9,
            "bn_momentum": 0.1, "bn_eps": 1e-5}


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seeds, bn = ctx.params, ctx.seeds, unit == "bn"
    x, y, x_test, y_test = flat_data(ctx)
    lrs = p["learning_rates"]
    nets = [(seed, lr) for seed in seeds for lr in lrs]
    net = StackedMLP(p["sizes"], [net_seed(s, i, bn) for s in seeds for i in range(len(lrs))], groups=len(seeds),
                     activation=p["activation"], batchnorm=bn, bn_impl=ctx.bn, init=p["init"],
                     momentum=p["bn_momentum"], eps=p["bn_eps"], device=ctx.device)
    trainer = StackedTrainer(net, x, y, torch.tensor(lrs * len(seeds)), p["batch_size"], group_seeds=list(seeds))
    losses, metrics = [], []
    first_hit = [math.nan] * len(nets)
    batches = trainer.batches()
    for step in progress(range(1, p["steps"] + 1), desc=f"lr-sweep {unit}"):
        losses.append(trainer.step(next(batches))[0])
        if step % p["eval_every"] == 0 or step == p["steps"]:
            test_loss, test_acc = trainer.evaluate(x_test, y_test)
            window = torch.stack(losses[-p["eval_every"]:]).mean(0)
            for g, ((seed, lr), a, tl, bl) in enumerate(zip(nets, per_net(test_acc), per_net(test_loss), per_net(window))):
                metrics.append({"batchnorm": bn, "seed": seed, "lr": lr, "step": step, "test_acc": a,
                                "test_loss": tl, "train_loss": bl})
                if math.isnan(first_hit[g]) and a >= p["target_acc"]:
                    first_hit[g] = step
    history = torch.stack(losses)  # (steps, G)
    tail = history[-max(1, len(losses) // 10):].mean(0)
    diverged = trainer.diverged.cpu() | ~torch.isfinite(tail).cpu() | (tail.cpu() > history[0].cpu())
    rows = []
    for g, (seed, lr) in enumerate(nets):
        last = metrics[-len(nets) + g]
        rows.append({"lr": lr, "batchnorm": bn, "seed": seed, "test_acc": last["test_acc"],
                     "train_loss": per_net(tail[g : g + 1])[0], "initial_loss": float(history[0, g]),
                     "diverged": bool(diverged[g]), "steps_to_90": None if math.isnan(first_hit[g]) else first_hit[g],
                     "steps": p["steps"]})
    return {"rows": rows, "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, LABELS, band, empty_note, new_figure, save_figure

    rows, metrics, p = folder.rows(), folder.metrics(), folder.config["params"]
    lrs = p["learning_rates"]
    fig, axes = new_figure(1, 2, size=(10, 3.8))
    for bn in (True, False):
        style = {"color": COLORS[bn], "linestyle": "-" if bn else "--", "marker": "o", "markersize": 3}
        band(axes[0, 0], lrs, row_grid(rows, {"batchnorm": bn}, "lr", lrs, "test_acc"), label=LABELS[bn], **style)
        band(axes[0, 1], lrs, row_grid(rows, {"batchnorm": bn}, "lr", lrs, "steps_to_90"), label=LABELS[bn], **style)
        for r in rows:
            if r["batchnorm"] == bn and r["diverged"]:
                axes[0, 0].plot(r["lr"], 0.02 if bn else 0.06, "x", color=COLORS[bn], markersize=7)
    axes[0, 0].set(xscale="log", ylim=(0, 1.02), xlabel="learning rate", ylabel="final test accuracy",
                   title="final test accuracy (× = diverged)")
    if any(r["steps_to_90"] for r in rows):
        axes[0, 1].set_yscale("log")
    else:
        axes[0, 1].set_yticks([])
        empty_note(axes[0, 1], f"no network reached {p['target_acc']:.0%} test accuracy in this run")
    axes[0, 1].set(xscale="log", xlabel="learning rate", ylabel="steps",
                   title=f"steps to {p['target_acc']:.0%} test accuracy (missing = never)")
    axes[0, 1].set_xlim(axes[0, 0].get_xlim())
    axes[0, 0].legend(loc="center left")
    save_figure(fig, folder.path / "lr_sweep_final.png")

    shown = [lr for lr in (0.1, 1.0, 10.0) if lr in lrs] or lrs[:3]
    fig, axes = new_figure(1, len(shown), size=(3.4 * len(shown), 3.2), sharey=True)
    for ax, lr in zip(axes[0], shown):
        for bn in (True, False):
            steps, runs = curves(metrics, {"batchnorm": bn, "lr": lr}, "step", "test_acc")
            if len(steps):
                band(ax, steps, runs, COLORS[bn], LABELS[bn], linestyle="-" if bn else "--")
        ax.set(title=f"lr = {lr:g}", xlabel="step", ylim=(0, 1.02))
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(loc="lower right")
    save_figure(fig, folder.path / "lr_sweep_curves.png")
    return [("lr_sweep_final.png", "Final test accuracy and steps to 90 % against the learning rate (mean and min–max over seeds)."),
            ("lr_sweep_curves.png", "Test accuracy during training at three learning rates.")]


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"{len(rows)} networks ({len(p['learning_rates'])} learning rates × with/without BN × "
             f"{counted(len(seeds), 'seed')}), "
             f"each trained for {p['steps']} SGD steps of batch {p['batch_size']}."]
    for bn in (True, False):
        by_lr: dict[float, list[dict]] = {}
        for r in rows:
            if r["batchnorm"] == bn:
                by_lr.setdefault(r["lr"], []).append(r)
        ok = [lr for lr, rs in sorted(by_lr.items())
              if all(not r["diverged"] and (r["test_acc"] or 0) >= p["target_acc"] for r in rs)]
        bad = [lr for lr, rs in sorted(by_lr.items()) if any(r["diverged"] for r in rs)]
        name = "With BN" if bn else "Without BN"
        if not by_lr:  # a partial run (bnlab report of an interrupted folder): nothing to say of them yet
            lines.append(f"{name}, no network has finished yet.")
            continue
        reach = f"every seed reaches {p['target_acc']:.0%} test accuracy at lr {', '.join(f'{v:g}' for v in ok)}" if ok \
            else f"no learning rate reaches {p['target_acc']:.0%} test accuracy"
        div = f"it diverges at lr {', '.join(f'{v:g}' for v in bad)}" if bad else "it never diverges"
        lines.append(f"{name}, {reach}; {div} (in at least one seed).")
    acc = group_stats(rows, ["lr", "batchnorm"], "test_acc")
    steps = group_stats(rows, ["lr", "batchnorm"], "steps_to_90")
    div = group_stats([{**r, "d": float(r["diverged"])} for r in rows], ["lr", "batchnorm"], "d")
    table = []
    for lr in p["learning_rates"]:
        rec = {"lr": lr}
        for bn, tag in ((True, "bn"), (False, "plain")):
            rec[f"{tag}_acc"] = next((s for s in acc if s["lr"] == lr and s["batchnorm"] == bn), None)
            rec[f"{tag}_steps"] = next((s for s in steps if s["lr"] == lr and s["batchnorm"] == bn), None)
            rec[f"{tag}_div"] = next((s for s in div if s["lr"] == lr and s["batchnorm"] == bn), None)
        table.append(rec)
    acc_cell = lambda k: (lambda r: mean_spread(r[k]) if r[k] else "–")  # noqa: E731

    def steps_cell(k):  # "–": no such network finished (a partial run); "never": none reached the target
        return lambda r: "–" if not r[k] else mean_spread(r[k], as_pct=False) if r[k]["n_finite"] else "never"

    div_cell = lambda k: (lambda r: f"{round(r[k]['mean'] * r[k]['n'])}/{r[k]['n']}" if r[k] else "–")  # noqa: E731
    lines += ["", "Per learning rate, mean ± std (min–max) over seeds; 'diverged' counts seeds:", "",
              markdown_table(table, [("lr", lambda r: f"{r['lr']:g}"), ("test acc, BN", acc_cell("bn_acc")),
                                     ("test acc, no BN", acc_cell("plain_acc")), ("steps to 90 %, BN", steps_cell("bn_steps")),
                                     ("steps to 90 %, no BN", steps_cell("plain_steps")),
                                     ("diverged, BN", div_cell("bn_div")), ("diverged, no BN", div_cell("plain_div"))])]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="lr-sweep",
    summary="BN paper's MNIST net (784-100x3-10, sigmoid), 12 learning rates 0.01..50, with vs without BN",
    runtime="full ~1 min with 3 seeds, quick ~2 s",
    claim="BN allows much higher learning rates and converges faster, where the network without BN diverges "
          "(seed 000; Ioffe & Szegedy 2015).",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: ["bn", "plain"],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
