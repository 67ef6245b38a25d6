"""Which device kernels one training step of torch.nn.BatchNorm2d and of bnlab.BatchNorm2d launches.

Claim checked (docs/benchmarks.md, "GPU kernels"): issue 5 sets bnlab against cuDNN on NCHW, but
whether torch.nn's BatchNorm2d runs cuDNN or PyTorch's native kernels depends on the version,
dtype and memory layout. This names them: one forward+backward of each layer under the profiler,
the kernels it launched listed in order with their count, per layout and dtype.

    PYTHONPATH=src python benchmarks/torch_kernel_names.py                 # on a GPU
    PYTHONPATH=src python benchmarks/torch_kernel_names.py --device cpu    # the plumbing (CPU ops)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import bnlab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import DTYPES, make_input, nchw_shape, refuse_unknown_names  # noqa: E402


def launched(layer: nn.Module, x: torch.Tensor, device: str) -> Counter:
    """Names of the kernels (CUDA) or operators (CPU) one forward+backward of ``layer`` runs."""
    xg = x.detach().clone().requires_grad_()
    for _ in range(2):  # warm: first-use compiling and autotuning stay out of the trace
        layer(xg).sum().backward()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        layer(xg).backward(torch.ones_like(x))
        if device == "cuda":
            torch.cuda.synchronize()
    wanted = "cuda" if device == "cuda" else "cpu"
    names = Counter()
    for event in prof.events():
        if str(event.device_type).lower().endswith(wanted) and (device != "cpu" or event.name.startswith("aten::")):
            names[event.name] += 1
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--shape", type=nchw_shape, default="32,64,56,56", help="N,C,H,W of the input")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"subset of {list(DTYPES)}")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    refuse_unknown_names(p, args, {"dtypes": DTYPES})
    channels = args.shape[1]
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, enabled {torch.backends.cudnn.enabled}")
    for dtype_name in args.dtypes.split(","):
        for layout in ("nchw", "cl"):
            x = make_input(args.shape, layout, DTYPES[dtype_name], args.device)
            for lib in (nn, bnlab):
                layer = lib.BatchNorm2d(channels).to(args.device)
                names = launched(layer, x, args.device)
                listing = "; ".join(f"{n} x{k}" if k > 1 else n for n, k in names.items())
                print(f"{lib.__name__:8s} {dtype_name} {layout}: {listing or '(nothing recorded)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
