"""inference: which statistics a BN network should use at test time (seeds 000, 002, 003).

One MLP 784–100–100–100–10 (ReLU, bnlab.BatchNorm1d after each hidden linear layer) is trained
with SGD; while it trains, extra copies of the running statistics are kept with other momenta
(forward pre-hooks feed every training batch to bnlab.stats.update_running_stats_). Then the
same trained weights are evaluated on the test set with

  (a) batch statistics, test batches of 1, 2, 4, …, 512 and 1,000 images (train mode, running
      statistics untouched). Batch size 1 is the classic failure: x − mean = 0, so every BN
      outputs β whatever the image; bnlab (like torch.nn) refuses a single value per channel in
      training mode, so that entry is computed from the formula (eval mode with γ = 0 gives β);
  (b) running averages with momenta 0.001 … 1 (1 = the last batch only);
  (c) the cumulative average over all training batches (momentum=None);
  (d) population statistics recomputed after training over the training set (Algorithm 2 of the
      BN paper: the mean of the batch means and of the unbiased batch variances).

Also: accuracy in train mode (batch statistics of the training batch size) against eval mode,
on training and test images; and a plain network (same data order, with biases, no BN) compared
with the BN network's predictions (seed 003): how often they agree and how far apart their
softmax outputs are (total variation distance, ½·Σ|p − q|, between 0 and 1).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.lab.experiments import Experiment
from bnlab.lab.models import MLP
from bnlab.lab.runner import RunContext
from bnlab.lab.train import evaluate, tensor_batches, train_loop
from bnlab.stats import moments, update_running_stats_

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
MOMENTA = [0.001, 0.01, 0.1, 0.5, 1.0]


def _params(quick: bool) -> dict:
    return {"sizes": [784, 100, 100, 100, 10], "activation": "relu", "lr": 0.1, "batch_size": 60,
            "steps": 60 if quick else 2000, "momenta": MOMENTA, "test_batch_sizes": BATCH_SIZES,
            "population_batch_size": 100}


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _StatTrackers:
    """Running means/variances of every BN layer's input for several momenta (None: cumulative)."""

    def __init__(self, model: nn.Module, momenta: list[float | None]) -> None:
        self.layers = _bn_layers(model)
        self.momenta = momenta
        self.stats = {m: [(torch.zeros_like(l.running_mean), torch.ones_like(l.running_var)) for l in self.layers]
                      for m in momenta}
        self.batches = 0
        self.handles = [l.register_forward_pre_hook(self._hook(i)) for i, l in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args):
            if module.training:
                if i == 0:
                    self.batches += 1
                batch = moments(args[0].detach())
                for m in self.momenta:
                    mean, var = self.stats[m][i]
                    update_running_stats_(mean, var, batch, 1.0 / self.batches if m is None else m)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _with_stats(model: nn.Module, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    clone = copy.deepcopy(model)
    for layer, (mean, var) in zip(_bn_layers(clone), stats):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return clone


@torch.no_grad()
def _population(model: nn.Module, x: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy whose running statistics are the BN paper's population estimates over x (Algorithm 2)."""
    clone = copy.deepcopy(model)
    for layer in _bn_layers(clone):
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: the mean over batches of μ_B and of unbiased σ²_B
    clone.train()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        clone(x[start : start + batch_size])
    for layer in _bn_layers(clone):
        layer.momentum = 0.1
    return clone.eval()


@torch.no_grad()
def _batch_stats_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, str | None]:
    """Test accuracy with each batch of ``batch_size`` normalized by its own statistics (last partial batch dropped)."""
    n = (len(y) // batch_size) * batch_size
    try:
        return evaluate(model, x[:n], y[:n], batch_size=batch_size, train_mode=True)[1], None
    except ValueError as err:  # batch size 1: the library refuses; the formula gives y = β for every input
        beta_only = copy.deepcopy(model)
        for layer in _bn_layers(beta_only):
            layer.weight.zero_()
        return evaluate(beta_only, x[:n], y[:n])[1], str(err)


def _train(model: nn.Module, ctx: RunContext, seed: int, x, y) -> None:
    p = ctx.params
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    batches = tensor_batches(x, y, p["batch_size"], torch.Generator().manual_seed(seed))
    train_loop(model, opt, batches, p["steps"], desc=f"inference seed {seed}")


def _run_unit(unit: str, ctx: RunContext) -> dict:
    p, seed = ctx.params, int(unit.split("=")[1])
    train, test = ctx.data
    x, y = train.flat().to(ctx.device), train.y.to(ctx.device)
    xt, yt = test.flat().to(ctx.device), test.y.to(ctx.device)
    torch.manual_seed(seed)
    bn_net = MLP(p["sizes"], p["activation"], batchnorm=True, bn_impl=ctx.bn).to(ctx.device)
    plain = MLP(p["sizes"], p["activation"], batchnorm=False).to(ctx.device)
    trackers = _StatTrackers(bn_net, [*p["momenta"], None])
    _train(bn_net, ctx, seed, x, y)
    trackers.remove()
    _train(plain, ctx, seed, x, y)

    batch_rows, error = [], None
    for b in p["test_batch_sizes"]:
        acc, err = _batch_stats_accuracy(bn_net, xt, yt, b)
        error = error or err
        batch_rows.append({"seed": seed, "batch_size": b, "test_acc": acc, "refused_by_library": err is not None,
                           "images": (len(yt) // b) * b})  # the whole batches scored (_batch_stats_accuracy)
    stat_rows = []
    for m in [*p["momenta"], None]:
        acc = evaluate(_with_stats(bn_net, trackers.stats[m]), xt, yt)[1]
        stat_rows.append({"seed": seed, "source": "cumulative" if m is None else f"momentum {m:g}", "momentum": m, "test_acc": acc})
    population = _population(bn_net, x, p["population_batch_size"])
    stat_rows.append({"seed": seed, "source": "population", "momentum": None, "test_acc": evaluate(population, xt, yt)[1]})

    with torch.no_grad():
        bn_net.eval()
        plain.eval()
        p_bn, p_plain = F.softmax(bn_net(xt), 1), F.softmax(plain(xt), 1)
        agree = float((p_bn.argmax(1) == p_plain.argmax(1)).float().mean())
        tv = float(0.5 * (p_bn - p_plain).abs().sum(1).mean())
    bs = p["batch_size"]
    bn_row = {"batchnorm": True, "seed": seed, "train_acc": evaluate(bn_net, x, y)[1], "test_acc": evaluate(bn_net, xt, yt)[1],
              "train_acc_train_mode": evaluate(bn_net, x, y, batch_size=bs, train_mode=True)[1],
              "test_acc_train_mode": evaluate(bn_net, xt, yt, batch_size=bs, train_mode=True)[1],
              "test_acc_population": stat_rows[-1]["test_acc"], "test_acc_cumulative": stat_rows[-2]["test_acc"],
              "test_acc_batch1": batch_rows[0]["test_acc"], "agreement_with_plain": agree, "tv_distance_to_plain": tv,
              "batch1_error": error}
    plain_row = {"batchnorm": False, "seed": seed, "train_acc": evaluate(plain, x, y)[1], "test_acc": evaluate(plain, xt, yt)[1],
                 "agreement_with_plain": 1.0, "tv_distance_to_plain": 0.0}
    return {"rows": [bn_row, plain_row], "tables": {"batch_stats": batch_rows, "running_stats": stat_rows}}


def _figures(folder):
    from bnlab.lab.experiments.inference_report import figures

    return figures(folder)


def _findings(folder):
    from bnlab.lab.experiments.inference_report import findings

    return findings(folder)


EXPERIMENT = Experiment(
    name="inference",
    summary="one trained BN net evaluated with batch stats (batch 1..1000), running averages, cumulative and population stats",
    runtime="full ~40 s with 3 seeds, quick ~3 s",
    claim="At test time BN must use fixed statistics: batch statistics fail for small test batches (batch 1 is "
          "meaningless), and running averages or population statistics recomputed over the training data work "
          "(seeds 000, 002, 003).",
    params=lambda config: _params(config["quick"]),
    seeds=((0, 1, 2), (0,)),
    units=lambda config: [f"seed={s}" for s in config["seeds"]],
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
)
