"""A whole model's training step and inference with bnlab's BatchNorm against torch.nn's.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-03*): what bnlab's BN changes in the time
of a real network's step on the CPU, where the convolutions take most of it. The network is the
lab's ResNet-20 (19 convs, 19 BN layers, `bnlab.lab.models.resnet20`), or with ``--model mlp``
the init-sweep's MLP (784-100x5-10, a BN after each hidden layer, `bnlab.lab.models.MLP`: five
(batch, 100) BN calls a step, where a call's fixed cost is most of its time; docs/benchmark_rounds.md,
*thirty-seventh session*), built twice with the same weights, once with each BN; a step is
forward, cross-entropy, backward and an SGD update on one batch of random CIFAR-sized images (for
the MLP, random (batch, 784) rows); inference is the eval-mode forward under no_grad, also of a
third copy with every BN folded into its conv (`bnlab.fold`); a frozen-BN step is a training step
with every BN layer in eval mode (fixed statistics, as when fine-tuning: BN's forward and backward
then run in eval mode with a graph). The variants are timed as bench_bn.py
times its contenders (bench_bn.time_interleaved: interleaved samples of about --min-sample seconds,
each round in an order of bench_timing.balanced_orders), and the medians are printed in milliseconds.

With --compile every model runs under torch.compile (inductor), and a third variant is added:
bnlab's model compiled as it was before bnlab.custom_ops, its graph broken at every BN layer
(the operators switched off while that variant compiles and runs).

    PYTHONPATH=src python benchmarks/bench_model_step.py [--batch 128] [--threads 2] [--rounds 12] [--layout cl] [--compile]
    PYTHONPATH=src python benchmarks/bench_model_step.py --model mlp --batch 100
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import time_interleaved  # noqa: E402
from bench_cases import positive_int  # noqa: E402
from bench_env import allocator_settings  # noqa: E402

import bnlab  # noqa: E402
from bnlab import custom_ops  # noqa: E402
# MODELS, twin_models, step_fn and inference_fn: the tests and other scripts import them from here too
from bnlab.lab.speed_models import MODELS, inference_fn, model_input, step_fn, twin_models  # noqa: E402,F401

BREAKS = "bnlab, graph breaks"


@contextlib.contextmanager
def operators_off():
    """bnlab's layers as torch.compile traced them before bnlab.custom_ops: a graph break each."""
    before = custom_ops.AVAILABLE
    custom_ops.AVAILABLE = False
    try:
        yield
    finally:
        custom_ops.AVAILABLE = before


def compiled_variants(make_models, make_fn, backend="inductor") -> dict:
    """{variant: callable to time}: each of make_models()'s fresh twins compiled, plus BREAKS;
    make_fn(model) is the callable. Each is called once here, so that compilation stays out of the
    samples."""
    # BREAKS compiles under a backend callable of its own: dynamo keeps one cache per code object,
    # and the twins share their forward's code. The graph-broken entry guards only the module
    # types (its trace stops before the BN layer reads custom_ops.AVAILABLE), so under the same
    # backend it also matched the "bnlab" twin, which then ran in 68 graph pieces instead of one;
    # a backend callable is part of every entry's guard (dynamo's BACKEND_MATCH).
    breaks = torch.compile(make_models()["bnlab"], backend=own_backend(backend))
    out = {name: make_fn(torch.compile(m, backend=backend)) for name, m in make_models().items()}
    inner = make_fn(breaks)

    def with_breaks():
        with operators_off():  # while it runs too: a recompilation must not take the operators
            return inner()

    out[BREAKS] = with_breaks
    for name, fn in out.items():
        start = time.perf_counter()
        fn()
        print(f"#   first call (compilation) of {name}: {time.perf_counter() - start:.1f} s")
    return out


def own_backend(backend, graphs: list | None = None):
    """The torch.compile backend ``backend`` (a name or a callable) under a callable of its own,
    appending each graph it compiles to ``graphs`` if given."""
    compile_with = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def own(gm, example_inputs):
        if graphs is not None:
            graphs.append(gm)
        return compile_with(gm, example_inputs)

    return own


def page_faults(fn) -> int:
    """Minor page faults of one call of fn: pages the allocator took fresh from the system (glibc
    hands freed blocks above its mmap threshold back, and their next use faults every page in)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=12, help="interleaved samples per variant")
    p.add_argument("--min-sample", type=float, default=1.0, help="seconds per sample (calls are repeated)")
    p.add_argument("--layout", default="nchw", choices=["nchw", "cl"])
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS), help="the network (default resnet20)")
    p.add_argument("--compile", action="store_true", help="every model under torch.compile, plus the graph-break variant")
    args = p.parse_args(argv)
    if not args.min_sample >= 0:
        p.error(f"--min-sample: expected seconds >= 0, got {args.min_sample}")
    torch.set_num_threads(args.threads)
    if args.compile:  # the twins share their forward's code: one cache entry per variant and mode
        torch._dynamo.config.recompile_limit = 64
    if args.model == "mlp" and args.layout != "nchw":
        p.error("--layout: the MLP's inputs are (batch, 784) rows, which have no channels-last form")

    def make_twins():
        return twin_models(args.layout, args.model)

    images, labels = model_input(args.model, args.batch, args.layout)
    network = {"resnet20": "ResNet-20", "mlp": "MLP 784-100x5-10"}[args.model]
    allocator = ", ".join(f"{name}={value}" for name, value in allocator_settings().items())
    print(f"# bench_model_step.py --model {args.model} --batch {args.batch} --threads {args.threads} --layout "
          f"{args.layout}{' --compile' if args.compile else ''}; {network}, milliseconds, medians of "
          f"{args.rounds} samples of about {args.min_sample} s; {allocator}")  # fmt: skip
    models = make_twins()
    table = {
        "training step": (lambda m: step_fn(m, images, labels), models),
        "inference": (lambda m: inference_fn(m, images), {**make_twins(), "bnlab folded": None}),
        # own copies: the frozen steps train other weights
        "frozen-BN step": (lambda m: step_fn(m, images, labels, frozen_bn=True), make_twins()),
    }
    for what, (make_fn, twins) in table.items():
        if args.compile:
            fns = compiled_variants(make_twins, make_fn)
            if "bnlab folded" in twins:  # no BN left: convolutions and inductor's code only
                fns["bnlab folded"] = make_fn(torch.compile(bnlab.fold(make_twins()["bnlab"].eval())))
                fns["bnlab folded"]()
        else:
            if "bnlab folded" in twins:
                twins["bnlab folded"] = bnlab.fold(make_twins()["bnlab"].eval())
            fns = {name: make_fn(m) for name, m in twins.items()}
        seconds = time_interleaved(fns, "cpu", args.rounds, args.min_sample)
        ms = {name: value * 1e3 for name, value in seconds.items()}
        ratios = f"  torch.nn/bnlab {ms['torch.nn'] / ms['bnlab']:.3f}"
        if BREAKS in ms:
            ratios += f"  graph breaks/bnlab {ms[BREAKS] / ms['bnlab']:.3f}"
        faults = ", ".join(f"{name} {page_faults(fn)}" for name, fn in fns.items())
        print(f"{what:14s} " + "  ".join(f"{name} {value:8.2f}" for name, value in ms.items()) + ratios)
        print(f"{'':14s} page faults in one call: {faults}")


if __name__ == "__main__":
    main()
