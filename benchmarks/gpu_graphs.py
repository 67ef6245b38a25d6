"""bnlab and torch.nn training steps replayed as CUDA graphs: what a step costs without the host.

Claim measured (docs/benchmarks.md, *GPU (Triton)*): on a GPU, tensors up to tens of MB are bound
by the host's time per call (Python, the autograd engine, the launches), not by the kernels.
A training loop captured with ``torch.cuda.make_graphed_callables`` replays the recorded kernels
without that host work; this script checks that a bnlab layer can be captured so (its forward
and backward sync nothing with the host and launch on the current stream), that the replayed
step computes what the eager step does (output, input and parameter gradients, running
averages, batch counter), and times both libraries eagerly and replayed (CUDA events over
back-to-back steps, medians).

    python benchmarks/gpu_graphs.py [--shapes conv-56,mlp-small] [--dtypes fp32,bf16] [--steps 200]

Needs a GPU. A library whose capture fails is reported, not fatal.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import SHAPES  # noqa: E402
from bench_cases import DTYPES, make_input, refuse_unknown_names  # noqa: E402
from bench_timing import events_us  # noqa: E402

import bnlab  # noqa: E402


def _layer(lib, x: torch.Tensor) -> nn.Module:
    name = "BatchNorm1d" if x.dim() <= 3 else f"BatchNorm{x.dim() - 2}d"
    return getattr(lib, name)(x.shape[1]).to(x.device)  # float32 parameters, as mixed precision keeps them


def compare(lib, x: torch.Tensor, dy: torch.Tensor, steps: int) -> str:
    """One library: "eager E us, graphed G us" after checking the graphed step against the eager one."""
    eager = _layer(lib, x)
    graphed_layer = copy.deepcopy(eager)
    xe, xg = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    try:
        graphed = torch.cuda.make_graphed_callables(graphed_layer, (xg,))
    except Exception as exc:  # reported: a library whose step cannot be captured
        return f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}"
    # make_graphed_callables ran warm-up steps on graphed_layer: bring the eager twin level first
    eager.load_state_dict(graphed_layer.state_dict())
    tol = 1e-2 if x.element_size() == 2 else 1e-4  # the same kernels on the same data: far closer in practice
    problems = []
    for _ in range(2):
        xe.grad = xg.grad = None
        for p in (*eager.parameters(), *graphed_layer.parameters()):
            p.grad = None
        ye, yg = eager(xe), graphed(xg)
        ye.backward(dy)
        yg.backward(dy)
        pairs = {"y": (yg, ye), "dx": (xg.grad, xe.grad), "dweight": (graphed_layer.weight.grad, eager.weight.grad),
                 "running_var": (graphed_layer.running_var, eager.running_var)}  # fmt: skip
        for name, (got, want) in pairs.items():
            if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
                problems.append(name)
    if int(graphed_layer.num_batches_tracked) != int(eager.num_batches_tracked):
        problems.append("num_batches_tracked")
    if problems:
        return f"graphed step differs from the eager one in {sorted(set(problems))}"

    def eager_step():
        eager(xe).backward(dy)

    def graphed_step():
        graphed(xg).backward(dy)

    for fn in (eager_step, graphed_step):
        for _ in range(5):
            fn()
    return f"eager {events_us(eager_step, steps):8.1f} us, graphed {events_us(graphed_step, steps):8.1f} us"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="conv-56,conv-14,mlp-small")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layouts", default="nchw")
    p.add_argument("--steps", type=int, default=200, help="back-to-back steps per timing")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected a positive number of steps, got {args.steps}")
    refuse_unknown_names(p, args, {"shapes": SHAPES, "dtypes": DTYPES, "layouts": ("nchw", "cl")})
    if not torch.cuda.is_available():
        p.error("a CUDA device is needed (CUDA graphs)")
    print(f"# gpu_graphs.py; torch {torch.__version__}, {torch.cuda.get_device_name()}; a training step "
          "(forward and backward) eagerly and replayed from a CUDA graph, us per step")  # fmt: skip
    for shape_name in args.shapes.split(","):
        for layout in args.layouts.split(","):
            if layout == "cl" and len(SHAPES[shape_name]) < 4:
                continue
            for dtype_name in args.dtypes.split(","):
                x = make_input(SHAPES[shape_name], layout, DTYPES[dtype_name], "cuda")
                dy = make_input(SHAPES[shape_name], layout, DTYPES[dtype_name], "cuda", seed=1)
                for name, lib in (("bnlab", bnlab), ("torch.nn", nn)):
                    print(f"{shape_name}/{layout}/{dtype_name} {name:8s}: {compare(lib, x, dy, args.steps)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
