"""The cases of a speed comparison, and the callables each case compares.

A case is a shape, a memory layout, a dtype and a mode (``MODES``); its contenders are bnlab's
layer, torch.nn's (eager and, on request, torch.compile'd) and two copies of the same bytes: a new
tensor (it allocates its output, as BN must) and a buffer allocated once (the machine's bandwidth,
without page faults). Each contender gets its own layer (so running statistics never interfere)
and the same input. Used by the lab's ``speed`` experiment and by benchmarks/bench_bn.py.

Byte accounting (the minimal traffic of each mode, issue 5's convention): forward and eval read x
and write y (2N bytes, N = numel x element size); forward+backward adds reading dy and x and
writing dx (5N). The fused modes count their extra tensors too (residual read, and its gradient).

``frozen_fwdbwd`` is forward+backward of a layer in eval mode (its running statistics frozen while
the network trains, as in fine-tuning; also inference outside no_grad): y from the running
statistics, then dx = dy·weight·invstd and the parameters' gradients (5N, as forward+backward).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

import bnlab
from bnlab.lab import speed_timing

MODES = ("fwd", "fwdbwd", "eval", "frozen_fwdbwd", "relu_fwdbwd", "addrelu_fwdbwd")
#: bytes moved per element of x, for the minimal-traffic GB/s of each mode (CPU: a channel's slice
#: stays in cache between the statistics and the normalize pass, so x is read once)
TRAFFIC = {"fwd": 2, "fwdbwd": 5, "eval": 2, "frozen_fwdbwd": 5, "relu_fwdbwd": 5, "addrelu_fwdbwd": 7}
#: on a GPU the issue counts what a two-kernel design must move: forward 3N (x read twice, y written),
#: backward 5N (dy and x read twice, dx written); the fused modes add the residual (read forward,
#: its gradient written backward); the 1-bit mask (N/8 each way) is not counted; frozen statistics
#: need no statistics pass: x read and y written forward, dy and x read and dx written backward
TRAFFIC_GPU = {"fwd": 3, "fwdbwd": 8, "eval": 2, "frozen_fwdbwd": 5, "relu_fwdbwd": 8, "addrelu_fwdbwd": 10}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


#: the benchmark's shapes by name: MLP activations (N, C) and conv activations (N, C, H, W)
SHAPES = {
    "mlp-small": (256, 100),
    "mlp-large": (8192, 100),
    "conv-56": (32, 64, 56, 56),
    "conv-14": (64, 256, 14, 14),
    "conv-32s": (128, 16, 32, 32),
    "conv-32l": (256, 64, 32, 32),
    # 25.7 MB with rows of 196 values, which split cache lines: the case that must not stream
    "conv-14l": (128, 256, 14, 14),
    # the lab's ResNet-20 at batch 128, last stage: 2 MB with rows of 64 values
    "conv-8": (128, 64, 8, 8),
    # GPU-sized (the GPU target is stated for tensors of 200 MB or more): 411 MB in fp32
    "gpu-112": (128, 64, 112, 112),
    "gpu-56": (128, 256, 56, 56),
}
CONV = ("conv-56", "conv-14", "conv-32s", "conv-32l")
GPU_LARGE = ("gpu-112", "gpu-56")

def make_input(shape, layout: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    # drawn on the GPU for cuda: a CPU draw of the 411 MB GPU shapes costs seconds per case in a short lease
    where = "cuda" if device == "cuda" else "cpu"
    gen = torch.Generator(device=where).manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32, device=where).to(device=device, dtype=dtype)
    if layout == "cl" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


BN_BY_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def bn_layer(lib, rank: int, channels: int, device: str = "cpu") -> nn.Module:
    """The BatchNorm1d/2d/3d of ``lib`` (bnlab or torch.nn) that takes inputs of ``rank`` dims."""
    return getattr(lib, BN_BY_RANK[rank])(channels).to(device)


class _TorchSequence(nn.Module):
    """torch.nn's unfused BN -> (+ residual) -> ReLU, the baseline of the fused modes."""

    def __init__(self, channels: int, residual: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.residual = residual

    def forward(self, x, res=None):
        y = self.bn(x)
        if self.residual:
            y = y + res
        return torch.relu(y)


def train_step(layer, x, dy, res=None) -> Callable[[], object]:
    """Forward and backward, gradients returned rather than accumulated (no extra add per step)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = [x] + ([res] if res is not None else [])

    def step():
        y = layer(*inputs)
        return torch.autograd.grad(y, inputs + params, dy)

    return step


def sample_grad_mode(mode: str):
    """The autograd mode a mode's calls are timed in: the context to enter around each sample.

    Eval runs inside one ``torch.no_grad()`` around the whole sample, as inference runs under one
    around the whole loop, rather than one per call: entering and leaving it costs about 2.2 us
    per call on the Zen 3 VM (docs/benchmark_rounds.md, thirty-sixth session), which bnlab and torch.nn
    would pay and the copies they are measured against would not. Training modes run with
    gradients on (a null context). Without it, eval layers with parameters that require
    gradients build an autograd graph and time that instead.
    """
    return torch.no_grad() if mode == "eval" else contextlib.nullcontext()


def contenders(shape, layout: str, dtype: torch.dtype, mode: str, device: str, compile_torch: bool) -> dict:
    """{name: zero-argument callable} for one case; every callable does the same work."""
    x = make_input(shape, layout, dtype, device)
    channels = x.shape[1]
    fused = {"relu_fwdbwd": "relu", "addrelu_fwdbwd": "addrelu"}.get(mode)
    out: dict[str, Callable[[], object]] = {}

    def build(lib_name: str):
        if fused is not None:
            if lib_name == "bnlab":
                return bnlab.BatchNormAct2d(channels, activation="relu", residual=(fused == "addrelu")).to(device)
            return _TorchSequence(channels, residual=(fused == "addrelu")).to(device)
        lib = bnlab if lib_name == "bnlab" else nn
        layer = bn_layer(lib, x.dim(), channels, device)
        # float32 parameters serve 16-bit inputs (mixed precision); torch's kernels refuse them
        # with float64 inputs, so float64 cases run float64 layers
        return layer.double() if dtype == torch.float64 else layer

    layers = {"bnlab": build("bnlab"), "torch": build("torch")}
    if compile_torch:
        dynamo_config = __import__("torch._dynamo", fromlist=["config"]).config
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 256)
        layers["torch.compile"] = torch.compile(build("torch"), dynamic=False)
    for layer in layers.values():
        layer.train(mode not in ("eval", "frozen_fwdbwd"))
    for name, layer in layers.items():
        if mode in ("fwd", "eval"):  # eval: timed inside sample_grad_mode("eval"), i.e. no_grad
            out[name] = (lambda layer: lambda: layer(x))(layer)
        else:
            xg = x.detach().clone().requires_grad_()
            dy = make_input(shape, layout, dtype, device, seed=1)
            res = make_input(shape, layout, dtype, device, seed=2).requires_grad_() if fused == "addrelu" else None
            out[name] = train_step(layer, xg, dy, res)
    out["copy"] = lambda: x.clone()  # a new tensor, as every contender allocates its output
    dst = torch.empty_like(x)
    out["copy_"] = lambda: dst.copy_(x)  # into a buffer allocated once: no page faults, the pure ceiling
    return out


def traffic_bytes(shape, dtype: torch.dtype, mode: str, device: str = "cpu") -> int:
    numel = 1
    for s in shape:
        numel *= s
    per_element = (TRAFFIC_GPU if device == "cuda" else TRAFFIC)[mode]
    return per_element * numel * torch.empty((), dtype=dtype).element_size()


def measure_case(shape, layout: str, dtype_name: str, mode: str, device: str = "cpu", rounds: int = 15,
                 min_sample_s: float = 0.02, compile_torch: bool = False) -> dict:
    """Times one case's contenders (speed_timing.interleaved_samples) and returns
    {"results": {name: {"ms", "GBps"}}, "ratios": {...}, "spread": {...}, "grad_enabled": bool}.

    Times are medians over the rounds. GB/s count the mode's minimal traffic (``traffic_bytes``; a
    copy's is 2N). Ratios: ``bnlab_vs_NAME`` is NAME's time over bnlab's (above 1: bnlab faster),
    and ``bnlab_fraction_of_copy`` / ``bnlab_fraction_of_copy_`` bnlab's GB/s over each copy's.
    Each is the median of that ratio read round by round (speed_timing.ratio_median; since the
    fifty-sixth session, the ratio of the medians before), so it need not equal the ratio of the
    times given; ``spread[KEY]`` is the [first, third] quartile of the same per-round values.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype_name: expected one of {list(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    fns = contenders(shape, layout, dtype, mode, device, compile_torch)
    with sample_grad_mode(mode):  # eval under no_grad, entered once for all its samples
        samples = speed_timing.interleaved_samples(fns, device, rounds, min_sample_s)
        grad_enabled = torch.is_grad_enabled()
    seconds = speed_timing.medians(samples)
    moved = traffic_bytes(shape, dtype, mode, device)
    copied = traffic_bytes(shape, dtype, "eval")  # a copy reads and writes N bytes once
    gbps = {name: (copied if name.startswith("copy") else moved) / s / 1e9 for name, s in seconds.items()}
    results = {name: {"ms": round(s * 1e3, 4), "GBps": round(gbps[name], 2)} for name, s in seconds.items()}
    # Each ratio is read round by round (speed_timing.ratio_median and ratio_quartiles); a fraction
    # of a copy's GB/s is the copy's time over bnlab's, times the bytes moved over those copied.
    scale = {name: moved / copied if name.startswith("copy") else 1.0 for name in samples}
    key = {name: f"bnlab_fraction_of_{name}" if name.startswith("copy") else f"bnlab_vs_{name}" for name in samples}
    others = [name for name in samples if name != "bnlab"]
    ratios = {key[n]: round(speed_timing.ratio_median(samples, n, "bnlab") * scale[n], 3) for n in others}
    spread = {key[n]: [round(q * scale[n], 3) for q in speed_timing.ratio_quartiles(samples, n, "bnlab")]
              for n in others}
    return {"results": results, "ratios": ratios, "spread": spread, "grad_enabled": grad_enabled}
