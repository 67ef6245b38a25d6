"""Where a ResNet-20 training step's time goes, eager and compiled, with bnlab's BN and torch.nn's.

Claim supported (docs/benchmark_rounds.md, fourteenth session): in a compiled step, bnlab's BN operators
plus the elementwise code inductor generates around them take less time than inductor's code for
torch.nn's BN (which it fuses with the ReLU and the residual add), and the convolutions take the
same time in both models. Each variant's step (bench_model_step.step_fn, batch of random
CIFAR-sized images) runs under torch.profiler, the variants interleaved round by round in
alternating order, with inductor's per-kernel profiling on; the profiler's self times are summed
into convolution forward, convolution backward, bnlab operators, inductor kernels and the rest, and
averaged over the rounds (milliseconds per step; "wall" is the step's own clock time, profiler
overhead included).

    PYTHONPATH=src python benchmarks/profile_model_step.py [--variants bnlab:c,torch.nn:c,bnlab:e,torch.nn:e] [--rounds 8]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import positive_int  # noqa: E402
from bench_model_step import step_fn, twin_models  # noqa: E402


def category(op_name: str) -> str:
    """The part of the step a profiler row belongs to."""
    if op_name.endswith("convolution_backward"):
        return "conv bwd"
    if op_name == "aten::mkldnn_convolution":
        return "conv fwd"
    if op_name.startswith("bnlab::"):
        return "bnlab ops"
    if "cpp_fused" in op_name:
        return "inductor kernels"
    return "rest"


def parse_variants(text: str) -> list[tuple[str, bool]]:
    """'bnlab:c,torch.nn:e' -> [("bnlab", True), ("torch.nn", False)] (c: compiled, e: eager)."""
    out = []
    for spec in text.split(","):
        name, _, mode = spec.partition(":")
        if name not in ("bnlab", "torch.nn") or mode not in ("c", "e"):
            raise argparse.ArgumentTypeError(f"--variants: expected bnlab|torch.nn followed by :c or :e, got {spec!r}")
        out.append((name, mode == "c"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=parse_variants, default=parse_variants("bnlab:c,torch.nn:c,bnlab:e,torch.nn:e"))
    p.add_argument("--rounds", type=positive_int, default=8)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel as its own profiler row
    torch._dynamo.config.recompile_limit = 64  # the twins share their forward's code
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)
    steps = {}
    for name, compiled in args.variants:
        model = twin_models("nchw")[name]
        steps[f"{name} {'compiled' if compiled else 'eager'}"] = step_fn(
            torch.compile(model) if compiled else model, images, labels
        )
    for step in steps.values():  # compilation and first-call work out of the rounds
        step(), step()
    totals = {label: collections.Counter() for label in steps}
    for r in range(args.rounds):
        for label in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            with torch.profiler.profile() as prof:
                start = time.perf_counter()
                steps[label]()
                wall = time.perf_counter() - start
            totals[label]["wall"] += wall * 1e3 / args.rounds
            for row in prof.key_averages():
                totals[label][category(row.key)] += row.self_cpu_time_total / 1e3 / args.rounds
    print(f"# profile_model_step.py --batch {args.batch} --threads {args.threads} --rounds {args.rounds}; "
          "ResNet-20 training step, ms per step (profiler self times)")  # fmt: skip
    parts = ["conv fwd", "conv bwd", "bnlab ops", "inductor kernels", "rest", "wall"]
    print(f"{'variant':18s}" + "".join(f"{part:>18s}" for part in parts))
    for label, total in totals.items():
        print(f"{label:18s}" + "".join(f"{total[part]:18.1f}" for part in parts))


if __name__ == "__main__":
    main()
