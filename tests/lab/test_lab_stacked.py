"""Stacked networks against torch.nn models built one at a time, and the dual first layer against the primal one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.lab.stacked import StackedMLP, stacked_loss_and_accuracy
from bnlab.lab.stacked_train import StackedTrainer

SIZES = [12, 7, 5, 3]


def _one_net(stack: StackedMLP, g: int) -> nn.Sequential:
    """Network g of the stack as an ordinary torch.nn model (torch.nn's BatchNorm1d: an outside oracle)."""
    G, layers = stack.num_nets, []
    hidden = stack.hidden
    for i, width in enumerate(hidden):
        fan_in = stack.sizes[i]
        w = stack.weights[0].view(G, width, fan_in)[g] if i == 0 else stack.weights[i][g]
        lin = nn.Linear(fan_in, width, bias=not stack.batchnorm)
        lin.weight.data.copy_(w.detach())
        if not stack.batchnorm:
            lin.bias.data.copy_(stack.bias[i].view(G, width)[g].detach())
        layers.append(lin)
        if stack.batchnorm:
            bn = nn.BatchNorm1d(width, eps=stack.eps, momentum=stack.momentum)
            bn.weight.data.copy_(stack.gamma[i].view(G, width)[g].detach())
            bn.bias.data.copy_(stack.beta[i].view(G, width)[g].detach())
            bn.running_mean.copy_(stack.running_mean[i].view(G, width)[g])
            bn.running_var.copy_(stack.running_var[i].view(G, width)[g])
            layers.append(bn)
        layers.append(nn.ReLU() if stack.activation == "relu" else nn.Sigmoid())
    out = nn.Linear(hidden[-1], SIZES[-1])
    out.weight.data.copy_(stack.weights[-1][g].detach())
    out.bias.data.copy_(stack.bias_out[g, :, 0].detach())
    layers.append(out)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("bn_impl", ["bnlab", "torch"])
@pytest.mark.parametrize("batchnorm,activation", [(True, "relu"), (False, "sigmoid"), (True, "sigmoid")])
def test_stack_trains_like_separate_torch_networks(batchnorm, activation, bn_impl):
    torch.manual_seed(0)
    G, S = 4, 2
    x = torch.randn(40, SIZES[0]) * 2 + 0.5
    y = torch.randint(0, SIZES[-1], (40,))
    lr = torch.tensor([0.1, 0.3, 0.05, 0.2])
    stack = StackedMLP(SIZES, [3, 1, 4, 1], groups=S, activation=activation, batchnorm=batchnorm, bn_impl=bn_impl,
                       init=torch.tensor([1.0, 0.5, 0.2, 1.5]))
    refs = [_one_net(stack, g) for g in range(G)]
    trainer = StackedTrainer(stack, x, y, lr, batch_size=10, group_seeds=[7, 8], first_layer="primal")
    for _, idx in zip(range(5), trainer.batches()):
        loss, _ = trainer.step(idx)
        for g, ref in enumerate(refs):
            b = idx[g // (G // S)]
            ref.train()
            ref_loss = F.cross_entropy(ref(x[b]), y[b])
            ref.zero_grad()
            ref_loss.backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr[g] * p.grad
            assert abs(float(loss[g]) - float(ref_loss.detach())) < 1e-5
    test_loss, test_acc = trainer.evaluate(x, y)
    for g, ref in enumerate(refs):
        ref.eval()
        with torch.no_grad():
            logits = ref(x)
        assert abs(float(F.cross_entropy(logits, y)) - float(test_loss[g])) < 1e-5
        assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(float(test_acc[g]))
        again = _one_net(stack, g)
        for p, q in zip(ref.state_dict().values(), again.state_dict().values()):
            if p.dtype.is_floating_point:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_dual_first_layer_matches_primal(batchnorm):
    torch.manual_seed(1)
    x = torch.rand(60, 20)
    y = torch.randint(0, 3, (60,))
    results = {}
    for mode in ("dual", "primal"):
        stack = StackedMLP([20, 8, 8, 3], list(range(6)), groups=3, batchnorm=batchnorm,
                           init=torch.tensor([1.0, 0.3, 0.1] * 2), dropout=torch.tensor([0.0, 0.2] * 3))
        trainer = StackedTrainer(stack, x, y, torch.linspace(0.05, 0.5, 6), 12, [5, 6, 7], first_layer=mode)
        for _ in range(4):
            for idx in trainer.epoch():
                trainer.step(idx)
        results[mode] = (trainer.evaluate_train(), trainer.evaluate(x[:17], y[:17]), stack.weights[0].detach().clone())
    (dual_train, dual_test, dual_w), (primal_train, primal_test, primal_w) = results["dual"], results["primal"]
    torch.testing.assert_close(dual_w, primal_w, rtol=1e-4, atol=1e-5)
    for a, b in zip(dual_train + dual_test, primal_train + primal_test):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_diverging_network_leaves_the_others_untouched():
    x = torch.rand(30, 10)
    y = torch.randint(0, 3, (30,))
    weights = {}
    for bad_lr in (0.1, 1e8):
        stack = StackedMLP([10, 6, 3], [0, 1, 2], groups=1, batchnorm=True)
        trainer = StackedTrainer(stack, x, y, torch.tensor([0.1, bad_lr, 0.2]), 10, [0])
        for _ in range(3):
            for idx in trainer.epoch():
                trainer.step(idx)
        weights[bad_lr] = (stack.weights[1].detach().clone(), trainer.diverged.clone())
    (w_ok, div_ok), (w_bad, div_bad) = weights[0.1], weights[1e8]
    assert div_bad.tolist() == [False, True, False] and not div_ok.any()
    # Equal up to rounding: a non-finite column may send a whole BN reduction down a float64 path.
    torch.testing.assert_close(w_bad[[0, 2]], w_ok[[0, 2]], rtol=1e-5, atol=1e-6)


def test_stacked_loss_and_accuracy_per_network():
    logits = torch.tensor([[[2.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [3.0, 1.0]]])  # (G=2, K=2, N=2)
    loss, acc = stacked_loss_and_accuracy(logits, torch.tensor([0, 0]), groups=1)
    assert acc.tolist() == [1.0, 0.0]
    expected = F.cross_entropy(logits[0].t(), torch.tensor([0, 0]))
    assert float(loss[0]) == pytest.approx(float(expected))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="groups"):
        StackedMLP([4, 3, 2], [0, 1, 2], groups=2)
    with pytest.raises(ValueError, match="init"):
        StackedMLP([4, 3, 2], [0, 1], init=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dropout"):
        StackedMLP([4, 3, 2], [0, 1], dropout=torch.tensor([0.5, 1.0]))
    stack = StackedMLP([4, 3, 2], [0])
    with pytest.raises(ValueError, match="batch_size"):
        StackedTrainer(stack, torch.rand(5, 4), torch.zeros(5, dtype=torch.long), 0.1, 6, [0])
    with pytest.raises(ValueError, match="first_layer"):
        StackedTrainer(stack, torch.rand(5, 4), torch.zeros(5, dtype=torch.long), 0.1, 5, [0], first_layer="x")
