"""What ``bnlab.fold`` takes out of a model's inference, against torch's own fuser.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-03, sixteenth session*): bnlab.fold removes
BN layers that ``torch.fx.experimental.optimization.fuse`` leaves (after a transposed convolution,
before a linear layer), with the same outputs, and the model's inference is faster by what those
layers cost. Three models, built with torch.nn's BN so that torch's fuser applies as designed, their
running statistics set by a few training batches:

- ``dcgan``: DCGAN's generator (Radford et al. 2015; z of 100 -> 64x64x3 image, ngf 64):
  ConvTranspose2d -> BN -> ReLU four times, then ConvTranspose2d -> tanh; batch 16;
- ``tabular``: BN on 64 input features, then (Linear -> BN -> ReLU) twice and a Linear; batch 4096;
- ``resnet20``: the lab's ResNet-20 (conv -> BN throughout: both fold all 19); batch 128.

For each: the BN layers each fuser leaves, the largest |difference| of its float64 copy's output
from the unfolded float64 model's (relative to the largest |output|), and float32 inference under
no_grad in milliseconds, unfolded vs torch's fuser vs bnlab.fold, each on its own copy, timed as
bench_bn.py times its contenders (interleaved samples, balanced orders, medians). A whole model's
time moves by 5-10 % between samples on a shared 2-core VM, more than small BN layers cost, so the
time of the BN layers torch's fuser leaves is also measured alone: each layer called on the input
it gets in the model, medians summed (what bnlab.fold saves beyond torch's fuser).

    PYTHONPATH=src python benchmarks/bench_fold.py [--threads 2] [--rounds 12] [--models dcgan,tabular,resnet20]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import time_interleaved  # noqa: E402
from bench_cases import positive_int  # noqa: E402
from bench_timing import median_us  # noqa: E402

import bnlab  # noqa: E402
from bnlab.lab.models import resnet20  # noqa: E402


def dcgan_generator(nz: int = 100, ngf: int = 64) -> nn.Module:
    def up(cin, cout, stride, padding):
        return [nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = up(nz, ngf * 8, 1, 0) + up(ngf * 8, ngf * 4, 2, 1) + up(ngf * 4, ngf * 2, 2, 1) + up(ngf * 2, ngf, 2, 1)
    return nn.Sequential(*layers, nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())


def tabular_mlp(features: int = 64, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(features),
        nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, 1),
    )  # fmt: skip


MODELS = {
    "dcgan": (dcgan_generator, lambda g: torch.randn(16, 100, 1, 1, generator=g)),
    "tabular": (tabular_mlp, lambda g: torch.randn(4096, 64, generator=g) * 5 + 3),
    "resnet20": (lambda: resnet20(bn_impl="torch"), lambda g: torch.randn(128, 3, 32, 32, generator=g)),
}


def calibrated(make, x: torch.Tensor) -> nn.Module:
    """make()'s model with running statistics from three training batches, in eval mode."""
    torch.manual_seed(0)
    model = make()
    model.train()
    with torch.no_grad():
        for step in range(3):
            model(x * (1 + 0.1 * step))
    return model.eval()


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bn_layers_ms(model: nn.Module, x: torch.Tensor, rounds: int) -> float:
    """The summed median time of model's BN layers, each called alone on the input it gets in model(x)."""
    inputs = {}
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0])) for m in layers]
    try:
        with torch.no_grad():
            model(x)
            return sum(median_us(lambda m=m: m(inputs[m]), rounds, 20) for m in layers) / 1e3
    finally:
        for hook in hooks:
            hook.remove()


def fusers() -> dict:
    """{name: function of an eval-mode model returning the model to time}."""
    with warnings.catch_warnings():  # the module imports torch.utils.mkldnn, which uses torch.jit's deprecated API
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse as torch_fuse
    return {"unfolded": lambda m: m, "torch fuse": lambda m: torch_fuse(m), "bnlab.fold": bnlab.fold}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=12, help="interleaved samples per variant")
    p.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample (calls are repeated)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: expected names from {', '.join(MODELS)}, got {', '.join(unknown)}")
    if not args.min_sample >= 0:
        p.error(f"--min-sample: expected seconds >= 0, got {args.min_sample}")
    torch.set_num_threads(args.threads)
    print(f"# bench_fold.py --threads {args.threads} --rounds {args.rounds}; torch {torch.__version__}; "
          f"inference ms (float32, no_grad), medians of {args.rounds} samples of about {args.min_sample} s")  # fmt: skip
    for name in names:
        make, make_input = MODELS[name]
        x = make_input(torch.Generator().manual_seed(1))
        base = calibrated(make, x)
        with torch.no_grad():
            ref64 = copy.deepcopy(base).double()(x.double())
        fns, notes, fns_models = {}, [], {}
        for fuser, apply in fusers().items():
            folded64 = apply(copy.deepcopy(base).double())
            with torch.no_grad():
                err = (folded64(x.double()) - ref64).abs().max().item() / ref64.abs().max().item()
            model = apply(copy.deepcopy(base))
            notes.append(f"{fuser}: {bn_count(folded64)} BN left, rel. diff {err:.1e}")
            fns[fuser], fns_models[fuser] = (lambda m: lambda: m(x))(model), model
        with torch.no_grad():
            ms = {k: v * 1e3 for k, v in time_interleaved(fns, "cpu", args.rounds, args.min_sample).items()}
        print(f"{name:9s} " + "  ".join(f"{k} {v:8.3f}" for k, v in ms.items())
              + f"  unfolded/torch fuse {ms['unfolded'] / ms['torch fuse']:.3f}"
              + f"  unfolded/bnlab.fold {ms['unfolded'] / ms['bnlab.fold']:.3f}")  # fmt: skip
        left_ms = bn_layers_ms(fns_models["torch fuse"], x, args.rounds)
        print(f"{'':9s} " + "; ".join(notes) + f"; the BN layers torch's fuser leaves, alone: {left_ms:.3f} ms")


if __name__ == "__main__":
    main()
