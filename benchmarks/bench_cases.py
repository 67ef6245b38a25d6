"""The callables a benchmark case compares: bnlab, torch eager, torch.compile'd torch, a copy.

Each contender gets its own layer (so running statistics never interfere) and the same input.
Byte accounting (the minimal traffic of each mode, the issue's convention): forward and eval read
x and write y (2N bytes, N = numel x element size); forward+backward adds reading dy and x and
writing dx (5N). The fused modes count their extra tensors too (residual read, and its gradient).

``frozen_fwdbwd`` is forward+backward of a layer in eval mode (its running statistics frozen while
the network trains, as in fine-tuning; also inference outside no_grad): y from the running
statistics, then dx = dy·weight·invstd and the parameters' gradients (5N, as forward+backward).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Callable

import torch
from torch import nn

import bnlab

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


def nchw_shape(text: str) -> tuple[int, int, int, int]:
    """An (N, C, H, W) shape from "64,256,14,14": the ``type=`` of the scripts' --shape options
    (argparse turns the error into "argument --shape: expected ...")."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,256,14,14, got {text!r}")
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected 4 positive sizes (N, C, H, W), got {text!r}")
    return shape


def positive_int(text: str) -> int:
    """The ``type=`` of the scripts' counts (--threads, --steps): argparse turns the error into
    "argument --threads: expected a positive integer, got '0'"."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def refuse_unknown_names(parser: argparse.ArgumentParser, args, allowed: dict) -> None:
    """parser.error naming the option and the unknown names, for each comma-separated option of
    ``allowed`` ({attribute: the names it may hold}) that holds another name."""
    for option, known in allowed.items():
        unknown = [v for v in getattr(args, option).split(",") if v not in known]
        if unknown:
            parser.error(f"--{option}: expected names from {list(known)}, got {', '.join(map(repr, unknown))}")


def positive_float(text: str) -> float:
    """The ``type=`` of the scripts' durations (--seconds): "argument --seconds: expected a positive
    number, got '-5'"."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def shape_parser(doc: str, default_shape: str, any_rank: bool = False) -> argparse.ArgumentParser:
    """The command line the per-shape scripts open with (eval_overhead.py, step_overhead.py,
    cold_call.py, eval_order.py, idle_ramp.py, eval_paths.py): the description from the script's
    docstring, --shape (N,C,H,W; N,C[,spatial...] where any_rank) and --threads (torch's intra-op
    threads, which bnlab's kernels follow)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    form = "N,C[,spatial...]" if any_rank else "N,C,H,W"
    p.add_argument("--shape", type=shape_arg if any_rank else nchw_shape, default=default_shape,
                   help=f"{form} (default {default_shape})")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    return p


def shape_arg(text: str) -> tuple[int, ...]:
    """N,C[,spatial...] of positive sizes, 2 to 5 of them (the accuracy scripts' --shapes)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected 2 to 5 comma-separated positive sizes such as 124,40,6, got {text!r}")
    return shape


def shapes_parser(doc: str, default_shapes) -> argparse.ArgumentParser:
    """The command line the accuracy scripts open with (stats_accuracy_16bit.py, dx_accuracy.py):
    the description from the script's docstring, --shapes (any rank) and --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape_arg, default=[shape_arg(s) for s in default_shapes])
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    return p


def parse_and_announce(p: argparse.ArgumentParser, argv, script: str, what: str):
    """The parsed arguments, torch's threads set from --threads, and the first line of the output:
    the script, its thread count, torch's version and what the figures are."""
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {script} --threads {args.threads}; torch {torch.__version__}; {what}")
    return args


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


def _train_step(layer, x, dy, res=None) -> Callable[[], object]:
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
            out[name] = _train_step(layer, xg, dy, res)
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
