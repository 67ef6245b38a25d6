"""conv: BN for conv layers is per channel (seed 000), not per activation as the book's layer does.

A small CNN (conv3x3(16) → norm → ReLU → maxpool → conv3x3(32) → norm → ReLU → maxpool → linear)
on the bundled MNIST, trained with SGD, in three versions:

- ``channel``: per-channel BN (BatchNorm2d): statistics over N·H·W values, one γ and β per channel;
- ``activation``: per-activation BN, what *Deep Learning from Scratch*'s layer does with a conv
  output: (N, C, H, W) flattened to (N, C·H·W), statistics over the N images only, one γ and β
  per position (BatchNorm1d(C·H·W)); it no longer treats positions of one feature map alike;
- ``none``: no normalization (the convs keep their biases).

Inputs are standardized with the training set's mean and std; test accuracy every ``eval_every`` steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves
from bnlab.lab.models import SmallCNN
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread
from bnlab.lab.train import evaluate, tensor_batches, train_loop

NORMS = ["channel", "activation", "none"]
_NAMES = {"channel": "per-channel BN", "activation": "per-activation BN", "none": "no BN"}


def _params(quick: bool) -> dict:
    return {"norms": NORMS, "lr": 0.05, "momentum": 0.0, "batch_size": 64, "steps": 20 if quick else 800,
            "eval_every": 10 if quick else 50, "target_acc": 0.95, "test_size": 200 if quick else 1000}


def _bn_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for p in m.parameters())


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p = ctx.params
    norm, seed = unit.split(",")[0], int(unit.split("=")[-1])
    train, test = ctx.data
    mean, std = float(train.x.mean()), float(train.x.std())
    x, y = ((train.x - mean) / std).to(ctx.device), train.y.to(ctx.device)
    xt, yt = ((test.x[: p["test_size"]] - mean) / std).to(ctx.device), test.y[: p["test_size"]].to(ctx.device)
    torch.manual_seed(seed)
    model = SmallCNN(norm, in_channels=x.shape[1], size=x.shape[-1], num_classes=train.num_classes, bn_impl=ctx.bn).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    batches = tensor_batches(x, y, p["batch_size"], torch.Generator().manual_seed(seed), shard=ctx.world.shard)
    metrics: list[dict] = []
    state = {"hit": math.nan}

    def on_eval(step: int) -> None:
        loss, acc = evaluate(model, xt, yt)
        metrics.append({"norm": norm, "seed": seed, "step": step, "test_acc": acc, "test_loss": loss})
        if math.isnan(state["hit"]) and acc >= p["target_acc"]:
            state["hit"] = step

    if ctx.is_main:  # with several processes, rank 0 evaluates (the model itself: no collective) and reports
        on_eval(0)
    losses = train_loop(ctx.parallel(model), opt, batches, p["steps"], eval_every=p["eval_every"],
                        on_eval=on_eval if ctx.is_main else None, desc=f"conv {unit}")
    if not ctx.is_main:
        return {"rows": []}
    train_loss, train_acc = evaluate(model, x[:1000], y[:1000])
    row = {"norm": norm, "seed": seed, "test_acc": metrics[-1]["test_acc"], "train_acc": train_acc,
           "train_loss": train_loss, "diverged": not math.isfinite(losses[-1]) or len(losses) < p["steps"],
           "steps_to_target": None if math.isnan(state["hit"]) else state["hit"],
           "bn_params": _bn_params(model), "params": sum(q.numel() for q in model.parameters())}
    return {"rows": [row], "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, band, empty_note, new_figure, save_figure

    metrics, rows = folder.metrics(), folder.rows()
    fig, axes = new_figure(1, 2, size=(10, 3.6))
    best = 0.0
    for norm in NORMS:
        steps, runs = curves(metrics, {"norm": norm}, "step", "test_acc")
        if len(steps):
            best = max(best, float(np.nanmax(runs)) if np.isfinite(runs).any() else 0.0)
            n_bn = next((r["bn_params"] for r in rows if r["norm"] == norm), 0)
            label = f"{_NAMES[norm]} ({n_bn:,} BN parameters)" if n_bn else _NAMES[norm]
            band(axes[0, 0], steps, runs, COLORS[norm], label)
            band(axes[0, 1], steps, runs, COLORS[norm], label)
    axes[0, 0].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.0), title="test accuracy during training")
    axes[0, 1].set(xlabel="step", ylim=(0.9, 1.0), title="the same, zoomed to 90–100 %")
    if best < 0.9:
        empty_note(axes[0, 1], f"no network reached 90 % in this run (best {100 * best:.0f} %)")
    axes[0, 0].legend(loc="lower right")
    save_figure(fig, folder.path / "conv.png")
    return [("conv.png", "Test accuracy of the small CNN with per-channel BN, per-activation BN and no BN "
             "(mean and min–max over seeds).")]


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    acc = {s["norm"]: s for s in group_stats(rows, ["norm"], "test_acc")}
    hit = {s["norm"]: s for s in group_stats(rows, ["norm"], "steps_to_target")}
    table = [{"norm": n, "acc": acc[n], "hit": hit[n], "bn_params": next(r["bn_params"] for r in rows if r["norm"] == n),
              "params": next(r["params"] for r in rows if r["norm"] == n)} for n in NORMS if n in acc]
    seed_count = counted(len(seeds), 'seed')
    lines = [f"{len(rows)} networks (3 normalizations × {seed_count}), SGD lr {p['lr']} "
             f"(momentum {p['momentum']}), batch {p['batch_size']}, {p['steps']} steps; test accuracy on "
             f"{p['test_size']} held-out images (mean ± std (min–max) over seeds).", "",
             markdown_table(table, [("normalization", lambda r: _NAMES[r["norm"]]), ("final test accuracy", lambda r: mean_spread(r["acc"])),
                                    (f"steps to {p['target_acc']:.0%}", lambda r: mean_spread(r["hit"], as_pct=False) if r["hit"]["n_finite"] else "never"),
                                    ("BN parameters (γ, β)", lambda r: f"{r['bn_params']:,}"),
                                    ("all parameters", lambda r: f"{r['params']:,}")]), "",
             "Per-channel BN normalizes each feature map with one mean and variance over the batch and all its "
             "positions; per-activation BN gives every position its own statistics, computed from the batch's "
             f"{p['batch_size']} images only, and its own γ and β."]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="conv",
    summary="small CNN on MNIST: per-channel BN vs per-activation BN (the book's flattening) vs no BN",
    runtime="full ~2 min with 3 seeds, quick ~2 s",
    claim="For conv layers BN normalizes per channel, over the batch and every position of the feature map "
          "(seed 000); that trains as well as or better than per-activation BN with a tiny fraction of its parameters, "
          "and faster than no BN.",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: [f"{n},seed={s}" for n in config["params"]["norms"] for s in config["seeds"]],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
    distributed=True,
)
