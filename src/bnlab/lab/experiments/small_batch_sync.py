"""small-batch-sync: with a few examples per process, synchronise BN across the processes.

An MLP 784–100–100–10 (ReLU, BN after each hidden linear layer) is trained on the bundled MNIST
by W CPU processes under DistributedDataParallel (gloo), each taking a per-process batch of B
images (B = 2, 4, 8, 16) out of a global batch of W·B, in three versions:

- ``local``: each process's BN layers normalize with the statistics of its own B images
  (torch.nn.BatchNorm1d semantics under DDP: gradients are averaged, BN statistics are not);
- ``sync``: bnlab.SyncBatchNorm: every BN layer normalizes with the statistics of all W·B images;
- ``single``: one process trains on the global batch of W·B images (rank 0; the reference).

All three see the same global batches in the same order from the same initial weights (same
seed), with the same SGD (momentum 0.9, lr 0.05) for the same number of steps, so they differ
only in the statistics BN normalizes with. Test accuracy is measured in eval mode with the
running statistics (rank 0's: the ones a saved model carries). Also recorded: the training loss
of the first steps, where SyncBN and the single process must agree up to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from bnlab.lab.experiments import Experiment
from bnlab.lab.experiments._common import curves, flat_data, net_seed, row_grid
from bnlab.lab.models import MLP
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import counted, group_stats, markdown_table, mean_spread
from bnlab.lab.train import evaluate, tensor_batches, train_loop
from bnlab.lab.world import parallel

MODES = ["local", "sync", "single"]
_NAMES = {"local": "local BN (per process)", "sync": "SyncBN (all processes)", "single": "one process, global batch"}
# SyncBN and the single process draw the same curve: SyncBN wide underneath, the single process dashed on top.
_STYLE = {"local": ("#ff7f0e", {"linestyle": "-"}), "sync": ("#1f77b4", {"linestyle": "-", "linewidth": 3.5, "alpha": 0.6}),
          "single": ("#2ca02c", {"linestyle": "--"})}


def _params(config: dict) -> dict:
    world = config["world_size"]
    if world < 2:
        raise ValueError(f"--nproc: small-batch-sync compares BN across processes and expected 2 or more, got {world}")
    if config["sync_bn"]:
        raise ValueError("--sync-bn: small-batch-sync trains local BN and SyncBN itself; expected no --sync-bn, got it")
    quick = config["quick"]
    return {"sizes": [784, 100, 100, 10], "world_size": world, "batches": [2, 8] if quick else [2, 4, 8, 16],
            "modes": MODES, "lr": 0.05, "momentum": 0.9, "steps": 20 if quick else 200,
            "eval_every": 10 if quick else 25, "early_steps": 10, "test_size": 200 if quick else 1000}


def _units(config: dict) -> list[str]:
    p = config["params"]
    return [f"batch={b},mode={m},seed={s}" for s in config["seeds"] for b in p["batches"] for m in p["modes"]]


def _parse(unit: str) -> tuple[int, str, int]:
    fields = dict(part.split("=") for part in unit.split(","))
    return int(fields["batch"]), fields["mode"], int(fields["seed"])


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, world = ctx.params, ctx.world
    batch, mode, seed = _parse(unit)
    if mode == "single" and not ctx.is_main:
        return {"rows": []}  # the reference trains on rank 0 alone; the others go on to the next unit
    x, y, xt, yt = flat_data(ctx, test_size=p["test_size"])
    global_batch = world.size * batch
    torch.manual_seed(net_seed(seed))  # the same initial weights in every mode and process
    model = MLP(p["sizes"], batchnorm=True, bn_impl=ctx.bn).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    gen = torch.Generator().manual_seed(net_seed(seed, batch))  # the same global batches in every mode
    if mode == "single":
        trained, batches = model, tensor_batches(x, y, global_batch, gen)
    else:
        trained = parallel(model, world, sync_bn=mode == "sync")
        batches = tensor_batches(x, y, global_batch, gen, shard=world.shard)
    metrics: list[dict] = []
    losses: list[float] = []
    key = {"mode": mode, "batch": batch, "seed": seed}

    def on_eval(step: int) -> None:
        loss, acc = evaluate(model, xt, yt)  # the module itself, eval mode: no collective
        window = losses[-p["eval_every"]:] if step else []
        metrics.append({**key, "step": step, "test_acc": acc, "test_loss": loss,
                        "train_loss": sum(window) / len(window) if window else math.nan})

    if ctx.is_main:
        on_eval(0)
    train_loop(trained, opt, batches, p["steps"], eval_every=p["eval_every"], on_eval=on_eval if ctx.is_main else None,
               desc=f"small-batch-sync {unit}", losses=losses)
    if not ctx.is_main:
        return {"rows": []}
    tail = losses[-max(1, len(losses) // 10):]
    row = {**key, "global_batch": global_batch, "world_size": world.size, "test_acc": metrics[-1]["test_acc"],
           "test_loss": metrics[-1]["test_loss"], "train_loss": sum(tail) / len(tail),
           "diverged": len(losses) < p["steps"] or not math.isfinite(losses[-1])}
    early = [{**key, "step": i + 1, "loss": v} for i, v in enumerate(losses[: p["early_steps"]])]
    return {"rows": [row], "metrics": metrics, "tables": {"early_loss": early}}


#: The largest relative difference of the early losses that float32 rounding accounts for.
_ROUNDING_GAP = 1e-4


def syncbn_reading(gap: float) -> str:
    """What SyncBN's largest relative gap to the single process over the first steps says: read from
    the measured gap, not assumed (a few float32 roundings stay far below _ROUNDING_GAP of the loss,
    while local BN's other statistics move it by percents)."""
    if gap < _ROUNDING_GAP:
        return "float32 rounding: the two compute the same function"
    return f"more than float32 rounding explains (above {_ROUNDING_GAP:.0e}): the two did not compute the same function"


def _early_gap(folder: RunFolder, mode: str) -> float:
    """Largest relative difference between ``mode``'s and the single process's loss over the first steps."""
    table = folder.table("early_loss")
    ref = {(r["batch"], r["seed"], r["step"]): r["loss"] for r in table if r["mode"] == "single"}
    gaps = [abs(r["loss"] - ref[k]) / abs(ref[k]) for r in table if r["mode"] == mode
            and (k := (r["batch"], r["seed"], r["step"])) in ref and r["loss"] is not None and ref[k]]
    return max(gaps, default=math.nan)


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import band, new_figure, save_figure

    rows, metrics, p = folder.rows(), folder.metrics(), folder.config["params"]
    batches, smallest = p["batches"], p["batches"][0]
    fig, axes = new_figure(1, 2, size=(10, 3.8))
    for mode in MODES:
        color, style = _STYLE[mode]
        band(axes[0, 0], batches, row_grid(rows, {"mode": mode}, "batch", batches, "test_acc"), color, _NAMES[mode],
             marker="o", **style)
        steps, runs = curves(metrics, {"mode": mode, "batch": smallest}, "step", "test_acc")
        if len(steps):
            band(axes[0, 1], steps, runs, color, _NAMES[mode], **style)
    axes[0, 0].set_xscale("log", base=2)
    axes[0, 0].set_xticks(batches, [str(b) for b in batches])
    axes[0, 0].set(xlabel=f"images per process (global batch = {p['world_size']} × this)", ylabel="final test accuracy",
                   title=f"{p['world_size']} processes, {p['steps']} steps")
    axes[0, 1].set(xlabel="step", ylabel="test accuracy", ylim=(0, 1),
                   title=f"during training, {smallest} images per process")
    axes[0, 0].legend(loc="lower right")
    save_figure(fig, folder.path / "small_batch_sync.png")
    return [("small_batch_sync.png", f"Test accuracy of local BN, SyncBN and one process with the same global batch, "
             f"against the per-process batch (left) and during training at {smallest} images per process (right); "
             "mean and min–max over seeds.")]


def _findings(folder: RunFolder) -> str:
    rows, p = folder.rows(), folder.config["params"]
    seeds = sorted({r["seed"] for r in rows})
    acc = {(s["batch"], s["mode"]): s for s in group_stats(rows, ["batch", "mode"], "test_acc")}
    by_key = {(r["batch"], r["mode"], r["seed"]): r["test_acc"] for r in rows}
    table = []
    for b in p["batches"]:
        diffs = [by_key[(b, "sync", s)] - by_key[(b, "single", s)] for s in seeds
                 if (b, "sync", s) in by_key and (b, "single", s) in by_key]
        table.append({"batch": b, **{m: acc.get((b, m)) for m in MODES},
                      "diff": max(diffs, key=abs) if diffs else None})
    cell = lambda m: lambda r: mean_spread(r[m]) if r[m] else "–"  # noqa: E731
    lines = [f"{len(rows)} networks (MLP {'–'.join(map(str, p['sizes']))}, BN after each hidden layer), "
             f"{p['world_size']} CPU processes (DDP over gloo), {counted(len(seeds), 'seed')}, {p['steps']} SGD steps "
             f"(lr {p['lr']}, momentum {p['momentum']}); test accuracy in eval mode on {p['test_size']} held-out "
             "images (mean ± std (min–max) over seeds).", "",
             markdown_table(table, [("images per process", "batch"),
                                    ("global batch", lambda r: str(r["batch"] * p["world_size"])),
                                    (_NAMES["local"], cell("local")), (_NAMES["sync"], cell("sync")),
                                    (_NAMES["single"], cell("single")),
                                    ("SyncBN − one process (largest over seeds)",
                                     lambda r: "–" if r["diff"] is None else f"{100 * r['diff']:+.1f} points")]), ""]
    sync_gap, local_gap = _early_gap(folder, "sync"), _early_gap(folder, "local")
    if not math.isnan(sync_gap):
        reading = syncbn_reading(sync_gap)
        lines.append(f"Training loss over the first {p['early_steps']} steps, relative to the single process on the "
                     f"global batch: SyncBN within {sync_gap:.1e} ({reading}), local BN up to {local_gap:.1e} apart.")
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="small-batch-sync",
    summary="local BN vs SyncBN vs one process on the global batch, 2-16 images per process, CPU processes",
    runtime="full ~2.5 min with 4 processes and 3 seeds, quick ~10 s (2 processes)",
    claim="When each process holds only a few examples, BN's batch statistics are too noisy and accuracy drops; "
          "synchronising the statistics across processes (SyncBatchNorm) restores the accuracy of one process "
          "training on the whole global batch.",
    params=_params,
    seeds=((0, 1, 2), (0,)),
    units=_units,
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
    distributed=True,
    world_sizes=(4, 2),
)
