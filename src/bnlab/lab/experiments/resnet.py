"""resnet: ResNet-20 with and without BN (seed 003).

He et al. 2016's CIFAR ResNet-20 (6n+2 = 20 layers, 16/32/64 channels, option-A shortcuts, BN
after every conv; bnlab.lab.models.CifarResNet), with BN or without.

- ``--dataset cifar10|cifar100 --data-dir DIR``: He et al.'s recipe: SGD with momentum 0.9,
  weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations;
  4-pixel padding + random 32×32 crop + horizontal flip; per-pixel mean subtracted. (Their
  table: 8.75 % test error for ResNet-20 on CIFAR-10 with BN.) Hours on a GPU-less machine.
- default: the bundled MNIST padded to 32×32, 1 input channel, inputs standardized, no
  augmentation, the same optimizer over a short schedule (lr ÷10 at 50 % and 75 % of the steps),
  so that it runs in minutes with nothing downloaded.

Without BN the convs get biases and the recipe changes so that the network trains at all: the
last conv of every residual branch starts at zero (each block starts as the identity, as in
Fixup / "zero-init residual"), and the learning rate is ``plain_lr`` (lower than BN's) — with
BN's lr 0.1 and standard init, a 20-layer ResNet without BN diverges or stalls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves
from bnlab.lab.models import resnet20
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread
from bnlab.lab.train import evaluate, tensor_batches, train_loop


def _params(config: dict) -> dict:
    quick, cifar = config["quick"], config["dataset"] != "mnist"
    steps = 64000 if cifar else 200
    if quick:
        steps = 6
    p = {"depth": 20, "batch_size": 128 if not quick else 32, "lr": 0.1, "plain_lr": 0.005, "momentum": 0.9,
         "weight_decay": 1e-4, "steps": steps, "lr_drops": [32000, 48000] if cifar and not quick else [steps // 2, 3 * steps // 4],
         "augment": cifar, "zero_init_residual_without_bn": True,
         "eval_every": 2000 if cifar else 25, "test_size": 10000 if cifar else 1000}
    if quick:
        p.update(eval_every=3, test_size=64)
    return p


def _prepare(ctx: RunContext):
    """(x_train, y_train, x_test, y_test, augment) with the dataset's preprocessing applied."""
    train, test = ctx.data
    x, xt = train.x, test.x[: ctx.params["test_size"]]
    if ctx.config["dataset"] == "mnist":
        x, xt = F.pad(x, (2, 2, 2, 2)), F.pad(xt, (2, 2, 2, 2))  # 28x28 -> 32x32
        mean, std = x.mean(), x.std()
        x, xt = (x - mean) / std, (xt - mean) / std
    else:
        pixel_mean = x.mean(0, keepdim=True)  # He et al.: per-pixel mean subtracted
        x, xt = x - pixel_mean, xt - pixel_mean
    return x, train.y, xt, test.y[: ctx.params["test_size"]]


def _crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """He et al.'s augmentation for a batch (N, C, 32, 32): 4-pixel zero padding, random crop, random flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    oy = torch.randint(0, 9, (n,), generator=gen)
    ox = torch.randint(0, 9, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p = ctx.params
    bn, seed = unit.startswith("bn"), int(unit.split("=")[-1])
    x, y, xt, yt = _prepare(ctx)
    torch.manual_seed(seed)
    model = resnet20(in_channels=x.shape[1], num_classes=ctx.data[0].num_classes, batchnorm=bn, bn_impl=ctx.bn,
                     zero_init_residual=not bn and p["zero_init_residual_without_bn"]).to(ctx.device)
    model = model.to(memory_format=torch.channels_last)
    lr = p["lr"] if bn else p["plain_lr"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=p["momentum"], weight_decay=p["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=p["lr_drops"], gamma=0.1)
    batches = tensor_batches(x, y, p["batch_size"], torch.Generator().manual_seed(seed),
                             transform=_crop_flip if p["augment"] else None, device=ctx.device, shard=ctx.world.shard)
    metrics: list[dict] = []
    losses: list[float] = []

    def on_eval(step: int) -> None:
        loss, acc = evaluate(model, xt, yt, batch_size=250, device=ctx.device)
        recent = losses[-p["eval_every"]:] if step else []
        train_loss = sum(recent) / len(recent) if recent else math.nan
        metrics.append({"batchnorm": bn, "seed": seed, "step": step, "test_acc": acc, "test_error": 1 - acc,
                        "test_loss": loss, "train_loss": train_loss})

    if ctx.is_main:  # with several processes, rank 0 evaluates (the model itself: no collective) and reports
        on_eval(0)
    train_loop(ctx.parallel(model), opt, batches, p["steps"], scheduler=sched, eval_every=p["eval_every"],
               on_eval=on_eval if ctx.is_main else None, desc=f"resnet {unit}", losses=losses)
    if not ctx.is_main:
        return {"rows": []}
    last = metrics[-1]
    tail = losses[-max(1, len(losses) // 10):]
    row = {"batchnorm": bn, "seed": seed, "dataset": ctx.config["dataset"], "lr": lr, "test_acc": last["test_acc"],
           "test_error": last["test_error"], "train_loss": sum(tail) / len(tail),
           "diverged": len(losses) < p["steps"] or not math.isfinite(losses[-1]), "steps": len(losses),
           "zero_init_residual": not bn and p["zero_init_residual_without_bn"]}
    return {"rows": [row], "metrics": metrics}


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import COLORS, LABELS, band, new_figure, save_figure

    metrics = folder.metrics()
    fig, axes = new_figure(1, 2, size=(10, 3.6))
    for bn in (True, False):
        for ax, key in ((axes[0, 0], "test_error"), (axes[0, 1], "train_loss")):
            steps, runs = curves(metrics, {"batchnorm": bn}, "step", key)
            if len(steps):
                band(ax, steps, runs, COLORS[bn], LABELS[bn], linestyle="-" if bn else "--")
    axes[0, 0].set(xlabel="step", ylabel="test error", ylim=(0, 1), title="test error")
    axes[0, 1].set(xlabel="step", ylabel="cross-entropy", yscale="log", title="training loss (mean since the last evaluation)")
    axes[0, 0].legend(loc="upper right")
    save_figure(fig, folder.path / "resnet.png")
    return [("resnet.png", "ResNet-20 with and without BN: test error and training loss (mean and min–max over seeds).")]


def _findings(folder: RunFolder) -> str:
    rows, c = folder.rows(), folder.config
    p = c["params"]
    seeds = sorted({r["seed"] for r in rows})
    err = {s["batchnorm"]: s for s in group_stats(rows, ["batchnorm"], "test_error")}
    loss = {s["batchnorm"]: s for s in group_stats(rows, ["batchnorm"], "train_loss")}
    data = c["dataset"] + (" (bundled MNIST subset, padded to 32×32)" if c["dataset"] == "mnist" and not c["data_dir"] else "")
    lines = [f"ResNet-20 on {data}, {counted(len(seeds), 'seed')}, {p['steps']} SGD steps of batch {p['batch_size']} "
             f"(momentum {p['momentum']}, weight decay {p['weight_decay']}, lr ÷10 at steps {p['lr_drops']}). "
             f"With BN: lr {p['lr']}. Without BN: lr {p['plain_lr']}"
             + (", last conv of every residual branch initialised to zero" if p["zero_init_residual_without_bn"] else "")
             + ", conv biases.", "",
             markdown_table([{"bn": bn, "err": err.get(bn), "loss": loss.get(bn)} for bn in (True, False) if bn in err],
                            [("network", lambda r: "with BN" if r["bn"] else "without BN"),
                             ("final test error", lambda r: mean_spread(r["err"])),
                             ("final training loss", lambda r: mean_spread(r["loss"], as_pct=False))])]
    if c["dataset"] == "cifar10" and p["steps"] >= 64000:
        lines += ["", "He et al. 2016 report 8.75 % test error for ResNet-20 with BN on CIFAR-10."]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="resnet",
    summary="ResNet-20 with vs without BN: bundled MNIST at 32x32 by default, CIFAR-10/100 with --data-dir",
    runtime="full ~5 min on the bundled MNIST (days on CIFAR without a GPU), quick ~2 s",
    claim="BN makes a 20-layer residual network train quickly and stably with a high learning rate; without BN it "
          "needs a gentler recipe and still trains more slowly (seed 003; He et al. 2016).",
    params=_params,
    seeds=((0, 1), (0,)),
    units=lambda config: [f"{'bn' if bn else 'plain'},seed={s}" for bn in (True, False) for s in config["seeds"]],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
    datasets=("mnist", "cifar10", "cifar100"),
    distributed=True,
)
