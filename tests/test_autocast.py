"""bnlab's layers under torch.autocast on the CPU, as torch.nn's layers behave there.

Mixed precision feeds BN the 16-bit output of an autocast convolution while its parameters and
running buffers stay float32. Oracles: torch.nn.BatchNorm*d under the same autocast (dtype of
every result, values within the 16-bit tolerance), and bnlab's eager layer for a compiled one
(the same bits: aot_eager, which keeps torch's own arithmetic around the operators; inductor may
fuse the convolutions' casts differently, which is not BN's doing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from conftest import TOLERANCE, assert_close

CASES = [  # (layer name, conv, input shape)
    ("BatchNorm1d", nn.Conv1d, (6, 3, 17)),
    ("BatchNorm2d", nn.Conv2d, (4, 3, 9, 11)),
    ("BatchNorm3d", nn.Conv3d, (2, 3, 5, 6, 4)),
]


def _net(lib, name: str, conv, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 6, 3), getattr(lib, name)(6), nn.ReLU(), conv(6, 4, 1), getattr(lib, name)(4))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _step(net: nn.Module, x: torch.Tensor, dtype: torch.dtype, training: bool) -> dict:
    """One autocast forward and backward: {name: tensor} of everything the step produced."""
    net.train(training)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = net(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    out = {"y": y, "dx": x.grad}
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        out[name] = tensor.grad if tensor.grad is not None else tensor
        if tensor.grad is not None:
            out[name + ".value"] = tensor.detach().clone()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,conv,shape", CASES, ids=[c[0] for c in CASES])
def test_autocast_step_matches_torch_nn(backend, dtype, training, name, conv, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 1
    ours = _step(_net(bnlab, name, conv, False), x, dtype, training)
    theirs = _step(_net(nn, name, conv, False), x, dtype, training)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, f"{key}: {ours[key].dtype} != torch.nn's {theirs[key].dtype}"
        # the BN outputs are 16-bit, its statistics and parameter gradients float32 from 16-bit data
        assert_close(ours[key], theirs[key], TOLERANCE[dtype], key)
    assert ours["y"].dtype == dtype and ours["1.running_mean"].dtype == torch.float32


def test_float32_input_under_autocast_stays_float32():
    layer = bnlab.BatchNorm2d(5)
    x = torch.randn(3, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert_close(y, nn.BatchNorm2d(5)(x), TOLERANCE[torch.float32], "y")


def test_fused_layer_under_autocast_matches_the_unfused_sequence():
    torch.manual_seed(0)
    conv, fused, plain = nn.Conv2d(3, 6, 3), bnlab.BatchNormAct2d(6, activation="relu"), nn.BatchNorm2d(6)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        got, want = fused(h), torch.relu(plain(h))
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, TOLERANCE[torch.bfloat16], "y")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_autocast_step_gives_the_eager_bits(training, channels_last):
    torch._dynamo.reset()
    x = torch.randn(4, 3, 9, 11, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eager = _step(_net(bnlab, "BatchNorm2d", nn.Conv2d, channels_last), x, torch.bfloat16, training)
    net = _net(bnlab, "BatchNorm2d", nn.Conv2d, channels_last)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    got = _step(compiled, x, torch.bfloat16, training)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert got.keys() == eager.keys()
    for key in eager:
        assert torch.equal(got[key], eager[key]), key
    torch._dynamo.reset()
