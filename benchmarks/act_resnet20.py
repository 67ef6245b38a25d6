"""The lab's ResNet-20 with every BN+ReLU (and BN+add+ReLU) as bnlab.BatchNormAct2d, against the
same network with bnlab.BatchNorm2d then F.relu, and with torch.nn's BN: a training step and
inference at batch 128.

Claim measured: in a whole ResNet-20 the fused layer gains only what BN+ReLU costs there, since
the convolutions take most of a step. The fused network gets the bnlab network's weights; its
outputs are checked equal to the bit before timing. Medians of interleaved samples, milliseconds.

    PYTHONPATH=src python benchmarks/act_resnet20.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import bnlab
from bnlab.lab import allocator, speed_timing
from bnlab.lab.speed_models import inference_fn, model_input, step_fn, twin_models


def _fused_block_forward(block, x):
    out = block.bn1(block.conv1(x))  # BN + ReLU in one layer
    shortcut = x
    if block.stride != 1:
        shortcut = shortcut[:, :, :: block.stride, :: block.stride]
    if block.extra_channels:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, block.extra_channels))
    return block.bn2(block.conv2(out), shortcut)  # BN + add + ReLU in one layer


def _act(bn, residual=False):
    layer = bnlab.BatchNormAct2d(bn.num_features, residual=residual)
    layer.load_state_dict(bn.state_dict())
    return layer


def fused(model):
    """A copy of the lab's ResNet-20 with BatchNormAct2d layers in place of BN then ReLU."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.bn1, block.bn2 = _act(block.bn1), _act(block.bn2, residual=True)
        block.forward = _fused_block_forward.__get__(block)
    model.stem_bn = _act(model.stem_bn)

    def forward(self, x):
        x = self.blocks(self.stem_bn(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    model.forward = forward.__get__(model)
    return model


def main() -> None:
    print(allocator.keep_freed_memory())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {speed_timing.cpu_model()}")
    models = twin_models("nchw", "resnet20")
    models["bnlab, BatchNormAct2d"] = fused(models["bnlab"])
    images, labels = model_input("resnet20", 128)
    with torch.no_grad():
        outputs = {name: model.eval()(images) for name, model in models.items()}
    assert torch.equal(outputs["bnlab"], outputs["bnlab, BatchNormAct2d"]), "the fused network's outputs differ"
    calls = (("training step", lambda m: step_fn(m, images, labels)), ("inference", lambda m: inference_fn(m, images)))
    for call, make in calls:
        seconds = speed_timing.time_interleaved({name: make(m) for name, m in models.items()}, "cpu", 7, 0.02)
        print(call + ": " + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in seconds.items()))


if __name__ == "__main__":
    main()
