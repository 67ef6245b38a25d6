"""Whole networks for a speed comparison: the same model and weights with bnlab's BN and with
torch.nn's, and the calls to time (a training step, inference).

Used by the lab's ``speed`` experiment (its model table) and benchmarks/bench_model_step.py.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.lab.models import MLP, resnet20

__all__ = ["MODELS", "twin_models", "step_fn", "inference_fn", "model_input"]

#: the models --model names: each builds the network with the BN of bn_impl ("bnlab" or "torch")
MODELS = {
    "resnet20": lambda bn_impl: resnet20(bn_impl=bn_impl),
    "mlp": lambda bn_impl: MLP([784, 100, 100, 100, 100, 100, 10], batchnorm=True, bn_impl=bn_impl),
}


def twin_models(layout: str, model: str = "resnet20") -> dict[str, nn.Module]:
    """{"bnlab": the model (MODELS) with bnlab BN, "torch.nn": the same weights with torch.nn BN}."""
    torch.manual_seed(0)
    models = {"bnlab": MODELS[model]("bnlab"), "torch.nn": MODELS[model]("torch")}
    models["torch.nn"].load_state_dict(models["bnlab"].state_dict())
    if layout == "cl":
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
    return models


def step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, frozen_bn: bool = False):
    """One SGD training step of model on (images, labels), as a zero-argument callable. With
    ``frozen_bn`` every BN layer stays in eval mode (fixed statistics, as when fine-tuning) while
    the rest trains, its weight and bias included."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def step():
        model.train()
        if frozen_bn:
            for layer in bn_layers:
                layer.eval()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return step


def inference_fn(model: nn.Module, images: torch.Tensor):
    def infer():
        model.eval()
        with torch.no_grad():
            return model(images)

    return infer


def model_input(model: str, batch: int, layout: str = "nchw", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one batch for MODELS[model]: random CIFAR-sized images (batch, 3, 32, 32)
    for resnet20, random (batch, 784) rows for the MLP, and labels among 10 classes."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 784) if model == "mlp" else (batch, 3, 32, 32)
    images = torch.randn(shape, generator=gen)
    if layout == "cl":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, (batch,), generator=gen)
