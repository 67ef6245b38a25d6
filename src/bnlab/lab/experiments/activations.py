"""activations: BN keeps the input of each sigmoid stable during training (seed 000; BN paper Figure 1).

The network of the lr-sweep (784–100–100–100–10, sigmoid, N(0, 1/fan_in) weights, batch 60),
trained with SGD at one learning rate, with and without BN. Every ``eval_every`` steps, on the
1,000 held-out images: the test accuracy, and the 15th, 50th and 85th percentiles of the input
to each sigmoid of the last hidden layer (for the BN network: γ·x̂ + β, what the sigmoid sees).

Reported per network: how far the median input of the last hidden layer's sigmoids moves over
training (mean over the 100 sigmoids of |median at the end − median at 10 % of the steps|; the
first 10 % are left out because at step 0 a BN network's running statistics are still their
initial values, so its eval-mode inputs are not yet normalized),
and the fraction of sigmoid inputs in the saturated range |z| > 3 (where σ'(z) < 0.05) at the end.
"""

from __future__ import annotations

import math

import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves, data_words, flat_data, net_seed, per_net
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder, progress
from bnlab.lab.stacked import StackedMLP
from bnlab.lab.stacked_train import StackedTrainer
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread

PERCENTILES = (15, 50, 85)


def _params(quick: bool) -> dict:
    return {"sizes": [784, 100, 100, 100, 10], "activation": "sigmoid", "init": "lecun", "lr": 0.5, "batch_size": 60,
            "steps": 100 if quick else 3000, "eval_every": 20 if quick else 50, "neuron": 0, "saturation": 3.0,
            "bn_momentum": 0.1, "bn_eps": 1e-5}


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seeds, bn = ctx.params, ctx.seeds, unit == "bn"
    x, y, x_test, y_test = flat_data(ctx)
    net = StackedMLP(p["sizes"], [net_seed(s, 0, bn) for s in seeds], groups=len(seeds), activation=p["activation"],
                     batchnorm=bn, bn_impl=ctx.bn, init=p["init"], momentum=p["bn_momentum"], eps=p["bn_eps"],
                     device=ctx.device)
    trainer = StackedTrainer(net, x, y, p["lr"], p["batch_size"], group_seeds=list(seeds))
    G, H = len(seeds), p["sizes"][-2]
    q = torch.tensor(PERCENTILES, dtype=torch.float32, device=ctx.device) / 100
    metrics, medians, batches = [], {}, trainer.batches()
    first_90: dict[int, int] = {}
    saturated = None
    for step in progress(range(0, p["steps"] + 1), desc=f"activations {unit}"):
        if step:
            trainer.step(next(batches))
        if step % p["eval_every"] and step != p["steps"]:
            continue
        _, acc, layers = trainer.evaluate(x_test, y_test, capture=True)
        z = layers[-1]  # (G·H, n): input of every sigmoid of the last hidden layer, per test image
        pct = torch.quantile(z, q, dim=1).view(len(PERCENTILES), G, H)  # (3, G, H)
        medians[step] = pct[1]
        saturated = (z.abs() > p["saturation"]).float().view(G, -1).mean(1)
        for g, seed in enumerate(seeds):
            record = {"batchnorm": bn, "seed": seed, "step": step, "test_acc": per_net(acc)[g]}
            if record["test_acc"] >= 0.9:
                first_90.setdefault(g, step)
            record.update({f"p{k}": float(pct[i, g, p["neuron"]]) for i, k in enumerate(PERCENTILES)})
            metrics.append(record)
    start = min(s for s in medians if s >= p["steps"] // 10)
    drift = (medians[p["steps"]] - medians[start]).abs().mean(1)  # (G,): mean over the H sigmoids
    rows = []
    for g, seed in enumerate(seeds):
        last = metrics[-G + g]
        rows.append({"batchnorm": bn, "seed": seed, "lr": p["lr"], "test_acc": last["test_acc"],
                     "steps_to_90": first_90.get(g),
                     "median_drift": float(drift[g]), "saturated_frac": float(saturated[g]),
                     "spread_final": last["p85"] - last["p15"], "steps": p["steps"]})
    return {"rows": rows, "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, LABELS, band, new_figure, save_figure

    metrics, p = folder.metrics(), folder.config["params"]
    fig, axes = new_figure(1, 3, size=(12, 3.6))
    for bn in (True, False):
        steps, runs = curves(metrics, {"batchnorm": bn}, "step", "test_acc")
        if len(steps):
            band(axes[0, 0], steps, runs, COLORS[bn], LABELS[bn], linestyle="-" if bn else "--")
    axes[0, 0].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02), title="(a) test accuracy")
    axes[0, 0].legend(loc="lower right")
    first_seed = min(m["seed"] for m in metrics)
    for ax, bn, tag in ((axes[0, 1], False, "(b) without BN"), (axes[0, 2], True, "(c) with BN")):
        for k, style in zip(PERCENTILES, (":", "-", "--")):
            steps, runs = curves(metrics, {"batchnorm": bn, "seed": first_seed}, "step", f"p{k}")
            if len(steps):
                ax.plot(steps, runs[0], style, color=COLORS[bn], label=f"{k}th percentile")
        ax.set(xlabel="step", title=tag)
        ax.legend(loc="best")
    lo = min(a.get_ylim()[0] for a in axes[0, 1:])
    hi = max(a.get_ylim()[1] for a in axes[0, 1:])
    for ax in axes[0, 1:]:
        ax.set_ylim(lo, hi)
    axes[0, 1].set_ylabel(f"input to sigmoid #{p['neuron']} of the last hidden layer")
    save_figure(fig, folder.path / "activations.png")
    return [("activations.png", f"(a) Test accuracy during training (mean and min–max over seeds); (b, c) the 15th, "
             f"50th and 85th percentiles over the test images of the input to one sigmoid of the last hidden layer "
             f"(seed {first_seed}), as in Figure 1 of the BN paper.")]


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    stats = {key: {s["batchnorm"]: s for s in group_stats(rows, ["batchnorm"], key)}
             for key in ("test_acc", "steps_to_90", "median_drift", "saturated_frac", "spread_final")}
    seed_count = counted(len(seeds), 'seed')
    lines = [f"{len(rows)} networks (with/without BN × {seed_count}), SGD at lr {p['lr']} for {p['steps']} steps of "
             f"batch {p['batch_size']}; the percentiles are over {data_words(folder.config)[1]}, measured every "
             f"{p['eval_every']} steps.",
             "", f"Median drift: the mean over the {p['sizes'][-2]} sigmoids of the last hidden layer of |median input at "
             "the end − at the "
             "start|, the start taken at 10 % of the steps. Saturated: the fraction of those inputs with |z| > " f"{p['saturation']:g} at the end.", ""]
    table = [{"bn": bn, **{k: stats[k].get(bn) for k in stats}} for bn in (True, False) if bn in stats["test_acc"]]
    cell = lambda k, pc=True: (lambda r: mean_spread(r[k], as_pct=pc) if r[k] else "–")  # noqa: E731
    lines.append(markdown_table(table, [("network", lambda r: "with BN" if r["bn"] else "without BN"),
                                        ("final test accuracy", cell("test_acc")),
                                        ("steps to 90 %", lambda r: mean_spread(r["steps_to_90"], as_pct=False)
                                         if r["steps_to_90"] and r["steps_to_90"]["n_finite"] else "never"),
                                        ("median drift", cell("median_drift", False)),
                                        ("15–85 % spread at the end", cell("spread_final", False)),
                                        ("saturated inputs", cell("saturated_frac"))]))
    reading = _against_the_claim(stats)
    if reading:
        lines += ["", reading]
    return "\n".join(lines)


def _compare(plain: float, bn: float) -> str:
    """How plain compares with bn: 'about the same' within a quarter of the larger, else more or less."""
    if abs(plain - bn) <= 0.25 * max(abs(plain), abs(bn)):
        return "about the same"
    return "more without BN" if plain > bn else "less without BN"


def _against_the_claim(stats: dict) -> str | None:
    """The two parts of the claim read from the measurement (the claim itself is the seed's words, which
    a run need not bear out: on the bundled subset the plain network's sigmoids saturate little)."""
    means = {k: {bn: stats[k][bn]["mean"] for bn in (True, False) if bn in stats[k]}
             for k in ("median_drift", "saturated_frac")}
    if any(len(m) < 2 or any(math.isnan(v) for v in m.values()) for m in means.values()):
        return None  # a partial run, or a diverged network's missing figures
    drift, sat = means["median_drift"], means["saturated_frac"]
    return (f"Measured against the claim: the median input drifted {drift[False]:.3g} without BN against "
            f"{drift[True]:.3g} with it ({_compare(drift[False], drift[True])}); {100 * sat[False]:.1f} % of the "
            f"inputs ended saturated without BN against {100 * sat[True]:.1f} % with it "
            f"({_compare(sat[False], sat[True])}).")


EXPERIMENT = Experiment(
    name="activations",
    summary="sigmoid inputs (15/50/85th percentiles) and test accuracy during training, with vs without BN (BN paper Fig. 1)",
    runtime="full ~20 s with 3 seeds, quick ~1 s",
    claim="Without BN the distribution of each layer's inputs keeps shifting during training (internal covariate "
          "shift) and sigmoids saturate; with BN it stays stable and training converges faster (seed 000; Ioffe & Szegedy 2015, Figure 1).",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: ["bn", "plain"],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
