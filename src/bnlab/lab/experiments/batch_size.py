"""batch-size: where BN breaks as the batch shrinks, and what recovers it.

Claim tested: BN's accuracy depends on the batch it normalizes over. With a few values per
channel the batch statistics are noisy, training-mode and evaluation-mode outputs drift apart,
and accuracy falls; GroupNorm and no normalization do not depend on the batch; Batch Renorm
and recalibrated running statistics are meant to recover part of the loss; Ghost BN keeps the
normalization batch small and fixed as the step batch grows.

Protocol. The small CNN of :mod:`batch_size_net` (3 conv layers whose norm layers see B·196,
B·49 and B values per channel) on the bundled MNIST subset, images average-pooled to 14×14 (a
quarter of the arithmetic; the digits stay legible) and standardized with the training set's
mean and std; 4,000 training and 1,000 test images. Per-step batch sizes B = 2, 4, …, 256.
Normalizations:

- ``bn``: BatchNorm2d (``--bn`` picks bnlab's or torch.nn's), momentum 0.1, eps 1e-5;
- ``bn-recal``: the same networks after ``bnlab.recalibrate`` over the whole training set in
  batches of ``recal_batch`` (500): exact population statistics. Large batches, because the
  pass normalizes upstream layers with its own batch statistics, and evaluation mode feeds the
  deeper layers inputs normalized with population statistics: a big batch reproduces those;
- ``ghost``: Ghost BN with ``virtual_batch_size = ghost_k`` (16), only for B > 16 (at B ≤ 16 it
  is BN exactly). Ghost BN is a large-batch tool (Hoffer et al. 2017): it keeps the batch the
  statistics come from at 16 while the step batch grows, so it can only matter on the right of
  the figure;
- ``ghost-control``: Ghost BN with ``virtual_batch_size = control_k`` (2) for B > 2: statistics
  from pairs of samples inside big step batches, a control separating the two things a small
  batch changes: if it breaks as BN at B = 2 does, the statistics break BN, not the optimizer;
- ``renorm``: Batch Renormalization (Ioffe 2017) with the paper's final limits rmax = 3,
  dmax = 5 and its schedule in proportion to our shorter training: plain BN for the first 5 %
  of the steps, then both limits grow linearly, reached at 50 %;
- ``gn``: torch.nn.GroupNorm with 4 channels per group (Wu & He 2018): per sample, no batch;
- ``none``: no normalization (the convs get biases).

Training: SGD, momentum 0.9, weight decay 5e-4, learning rate decayed linearly to 0. The budget
is 2 epochs (8,000 samples) at every B, the protocol of batch-size studies (Goyal et al. 2017;
Wu & He 2018), except that every network takes at least 200 steps: two epochs of B ≥ 64 are
31–125 steps, too few to train, and the right side of the figure would then measure
under-training, not normalization (Hoffer et al.'s "train longer" regime adaptation). So B ≤ 32
sees 2 epochs (4,000 to 250 steps), B = 64, 128, 256 take 200 steps (3.2, 6.4, 12.8 epochs). Learning rate, linear scaling
with a cap: lr = 0.05 · B / 32, at most 0.1 (reached at B = 64), the same rule for every
normalization (no normalization trains at 0.1 and is unstable above). Seeds 0, 1, 2 change the
initial weights and the batch order (the same per seed for every normalization and batch size);
the three seeds' networks are trained at once as one stacked network (:class:`StackedCNN`),
one unit per (normalization, B).

Measured per network: test and training accuracy in evaluation mode; test accuracy in training
mode (each test batch of B normalized with its own statistics, what the network saw while it
trained); for the BN-type layers, ``bnlab.diagnose`` on training batches of B before
recalibration (per layer in the table ``diagnose``, the layer with the largest train/eval output
gap in the row) and the test accuracy after ``bnlab.recalibrate``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab
from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import net_seed
from bnlab.lab.experiments.batch_size_net import CNN, NormFactory, StackedCNN
from bnlab.lab.models import batchnorm_layer
from bnlab.lab.runner import RunContext
from bnlab.lab.train import index_batches, train_loop

#: normalizations that are trained; "bn-recal" rows come from the "bn" units.
TRAINED = ("bn", "ghost", "ghost-control", "renorm", "gn", "none")
BN_TYPES = ("bn", "ghost", "ghost-control", "renorm")


def _params(quick: bool) -> dict:
    p = {"batch_sizes": [2, 4, 8, 16, 32, 64, 128, 256], "norms": list(TRAINED), "image_size": 14,
         "train_size": 4000, "test_size": 1000, "epochs": 2, "min_steps": 200, "lr_base": 0.05, "lr_ref_batch": 32,
         "lr_cap": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "bn_momentum": 0.1, "ghost_k": 16, "control_k": 2,
         "rmax": 3.0, "dmax": 5.0, "renorm_ramp": [0.05, 0.5], "gn_channels_per_group": 4, "recal_batch": 500,
         "diagnose_samples": 256}
    if quick:
        p.update(batch_sizes=[4, 32], train_size=128, test_size=200, epochs=1, min_steps=20, diagnose_samples=32)
    return p


def lr_for(batch_size: int, p: dict) -> float:
    """Linear scaling with a cap: lr_base · B / lr_ref_batch, at most lr_cap."""
    return min(p["lr_base"] * batch_size / p["lr_ref_batch"], p["lr_cap"])


def steps_for(batch_size: int, p: dict) -> int:
    """``epochs`` over the training set, but at least ``min_steps`` steps (module docstring)."""
    return max(p["epochs"] * p["train_size"] // batch_size, p["min_steps"])


def _units(config: dict) -> list[str]:
    p = config["params"]
    skip = {"ghost": p["ghost_k"], "ghost-control": p["control_k"]}  # Ghost BN with k >= B is BN
    return [f"{norm},B={b}" for norm in p["norms"] for b in p["batch_sizes"] if b > skip.get(norm, 0)]


def norm_factory(norm: str, p: dict, steps: int, bn_impl: str) -> NormFactory | None:
    """The layer after each conv for normalization ``norm`` (None: no normalization)."""
    if norm == "none":
        return None
    if norm == "gn":
        return lambda c: nn.GroupNorm(c // p["gn_channels_per_group"], c)
    if norm == "bn":
        return lambda c: batchnorm_layer(bn_impl, 2, c, momentum=p["bn_momentum"])
    # Ghost BN and Batch Renorm are options of bnlab's layer, whatever --bn says.
    options = {"ghost": {"virtual_batch_size": p["ghost_k"]}, "ghost-control": {"virtual_batch_size": p["control_k"]},
               "renorm": {"renorm": True, "rmax": p["rmax"], "dmax": p["dmax"],
                          "renorm_ramp": (round(p["renorm_ramp"][0] * steps), round(p["renorm_ramp"][1] * steps))}}
    if norm not in options:
        raise ValueError(f"norm: expected one of {list(TRAINED)}, got {norm!r}")
    return lambda c: bnlab.BatchNorm2d(c, momentum=p["bn_momentum"], **options[norm])


def _images(split, size: int, mean: float | None = None, std: float | None = None):
    """(N, 1, size, size) standardized images, average-pooled from 28×28."""
    x = F.adaptive_avg_pool2d(split.x, size)
    mean = float(x.mean()) if mean is None else mean
    std = float(x.std()) if std is None else std
    return (x - mean) / std, mean, std


@torch.no_grad()
def stacked_accuracy(model: StackedCNN, x: Tensor, y: Tensor, batch_size: int, train_mode: bool = False) -> list[float]:
    """Each stacked network's accuracy on (x, y) (every network sees the same images).

    In train mode every batch of ``batch_size`` is normalized with its own statistics, only full
    batches are used (a last batch of one sample has no statistics at the 1×1 layer), and the
    running statistics are restored afterwards.

    Args:
        model: the S stacked networks.
        x, y: images (n, 1, H, W) and labels (n,).
        batch_size: images per forward.
        train_mode: normalize with batch statistics instead of the running ones.

    Returns:
        S accuracies (floats in [0, 1]), in stack order.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    was_training = model.training
    model.train(train_mode)
    n = (len(y) // batch_size) * batch_size if train_mode else len(y)
    correct = torch.zeros(model.count)
    try:
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb.expand(-1, model.count, -1, -1))  # (b, S, K)
            correct += (logits.argmax(-1) == yb[:, None]).sum(0).cpu()
    finally:
        model.train(was_training)
        if train_mode:
            model.load_state_dict(saved, strict=False)
    return [float(c) / max(n, 1) for c in correct]


def _stacked_batches(x: Tensor, y: Tensor, batch_size: int, generators: list[torch.Generator]):
    """Endless (x (B, S, H, W), y (B, S)) batches: network s draws its own shuffled batches."""
    streams = [index_batches(len(y), batch_size, g) for g in generators]
    while True:
        idx = torch.stack([next(s) for s in streams], dim=1)  # (B, S)
        yield x[idx].squeeze(2), y[idx]  # x[idx]: (B, S, 1, H, W)


def _diagnose(net: CNN, x: Tensor, batch_size: int, samples: int) -> tuple[dict, list[dict]]:
    """bnlab.diagnose on training batches of ``batch_size``: the worst layer (largest output gap) and every layer.

    ``samples`` images, but at least 4 batches (the batch-noise column is a scatter between batches).
    """
    count = min(max(samples // batch_size, 4), len(x) // batch_size)
    batches = [x[i * batch_size : (i + 1) * batch_size] for i in range(count)]
    report = bnlab.diagnose(net, batches, show=False, progress=False)
    layers = [{"layer": d.name, "gap": d.output_gap, "mean_shift": d.worst_mean_shift, "var_ratio": d.worst_var_ratio,
               "batch_noise": d.rms_batch_noise, "advice": "; ".join(d.advice) or "ok"} for d in report.layers]
    worst = max(layers, key=lambda r: -1.0 if math.isnan(r["gap"]) else r["gap"])
    return {f"diag_{k}": v for k, v in worst.items()}, layers


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seeds = ctx.params, ctx.seeds
    norm, b = unit.split(",")[0], int(unit.split("=")[-1])
    train, test = ctx.data
    train = train.take(p["train_size"])
    x, mean, std = _images(train, p["image_size"])
    xt, _, _ = _images(test.take(p["test_size"]), p["image_size"], mean, std)
    x, y, xt, yt = x.to(ctx.device), train.y.to(ctx.device), xt.to(ctx.device), test.y[: p["test_size"]].to(ctx.device)
    steps, lr = steps_for(b, p), lr_for(b, p)
    factory = norm_factory(norm, p, steps, ctx.bn)
    nets = []
    for seed in seeds:
        torch.manual_seed(net_seed(seed, 0))  # the same initial weights at every B for a seed
        nets.append(CNN(factory, train.num_classes))
    model = StackedCNN(nets, factory).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=p["momentum"], weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    batches = _stacked_batches(x, y, b, [torch.Generator().manual_seed(net_seed(s, 1)) for s in seeds])
    S = len(seeds)

    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        # The sum of the S networks' mean cross-entropies: each network gets its own gradient.
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / target.shape[0]

    losses = train_loop(model, opt, batches, steps, scheduler=sched, loss_fn=loss_fn, desc=f"batch-size {unit}")
    model.eval()
    finite = [all(bool(torch.isfinite(t).all()) for t in model.network(s).state_dict().values()) for s in range(S)]
    test_acc = stacked_accuracy(model, xt, yt, p["recal_batch"])
    train_acc = stacked_accuracy(model, x, y, p["recal_batch"])
    batch_mode = stacked_accuracy(model, xt, yt, b, train_mode=True) if norm != "none" else test_acc
    base = {"batch_size": b, "lr": lr, "steps": len(losses), "epochs": len(losses) * b / len(y)}
    rows, table = [], []
    diag = [_diagnose(model.network(s), x, b, p["diagnose_samples"]) if norm in BN_TYPES else ({}, []) for s in range(S)]
    for s, seed in enumerate(seeds):
        rows.append({"norm": norm, "seed": seed, **base, "train_acc": train_acc[s], "test_acc": test_acc[s],
                     "test_acc_batch_stats": batch_mode[s], "eval_minus_batch_stats": test_acc[s] - batch_mode[s],
                     "diverged": not finite[s] or len(losses) < steps, **diag[s][0]})
        table += [{"norm": norm, "batch_size": b, "seed": seed, **layer} for layer in diag[s][1]]
    if norm in BN_TYPES:
        recal = [x[i : i + p["recal_batch"]].expand(-1, S, -1, -1) for i in range(0, len(y), p["recal_batch"])]
        bnlab.recalibrate(model, recal, progress=False)
        recal_test = stacked_accuracy(model, xt, yt, p["recal_batch"])
        recal_train = stacked_accuracy(model, x, y, p["recal_batch"])
        for s, row in enumerate(rows):
            row["recal_test_acc"] = recal_test[s]
        if norm == "bn":
            rows += [{**row, "norm": "bn-recal", "train_acc": recal_train[s], "test_acc": recal_test[s],
                      "eval_minus_batch_stats": recal_test[s] - row["test_acc_batch_stats"]}
                     for s, row in enumerate(list(rows))]
    return {"rows": rows, "metrics": [], "tables": {"diagnose": table}}


def _figures(folder):
    from bnlab.lab.experiments.batch_size_report import figures

    return figures(folder)


def _findings(folder):
    from bnlab.lab.experiments.batch_size_report import findings

    return findings(folder)


EXPERIMENT = Experiment(
    name="batch-size",
    summary="accuracy against batch size 2…256: BN, Ghost BN, Batch Renorm, GroupNorm, none, BN + recalibrate",
    runtime="full ~4 min with 3 seeds, quick ~5 s",
    claim="BN needs enough values per channel in a batch: with tiny batches its statistics are noisy, training and "
          "evaluation disagree and accuracy falls, while GroupNorm and no normalization do not depend on the batch; "
          "Batch Renorm and recalibrated statistics recover part of the loss, and Ghost BN keeps the normalization "
          "batch small inside large batches.",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=_units,
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
