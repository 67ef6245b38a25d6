"""Layer calls of wide layers at small batches with and without the narrow walks' thread rule.

Claim measured (docs/benchmark_rounds.md, forty-sixth session; cpu.NARROW_CHANNEL_VALUES): a
training call that the narrow NLC walks take (at most cpu.NARROW_ROWS rows) is mostly per-channel
float64 work, so counting each channel as NARROW_CHANNEL_VALUES values towards
cpu.PARALLEL_MIN_NUMEL puts the widest of them on torch's threads, where they take less time, and
leaves the others on one thread.

How: one process, bnlab's compiled training calls (bnlab.BatchNorm1d, float32) with the rule set
up on and off in turn (cpu_entries.setup_whole_calls with NARROW_CHANNEL_VALUES or 0), in
interleaved samples whose order alternates; medians in microseconds of a training forward and of a
training step (forward and torch.autograd.grad of x, weight and bias).

    PYTHONPATH=src python benchmarks/narrow_threads_ab.py [--threads 2] [--samples 21]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import positive_int  # noqa: E402
from bench_timing import sample_seconds  # noqa: E402

import bnlab  # noqa: E402
from bnlab.backends import _REGISTRY, cpu, cpu_entries  # noqa: E402

SHAPES = [(2, 8192), (3, 8192), (4, 4096), (8, 2048), (2, 4096), (4, 2048), (16, 1024), (2, 2048), (256, 100)]


def _set_rule(backend, channel_values: int) -> None:
    cpu_entries.setup_whole_calls(backend._lib, backend, cpu._CODE, cpu.PARALLEL_MIN_NUMEL, cpu.WAVE_PER_THREAD,
                                  (cpu.NARROW_ROWS, channel_values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive_int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--samples", type=positive_int, default=21, help="interleaved samples per setting")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bnlab.BatchNorm1d(4)(torch.randn(4, 4))  # the CPU backend's compiled calls set up
    backend = next(b for b in _REGISTRY if b.name == "cpu")
    if backend._lib is None or backend.train_entry() is None:
        p.error("the compiled CPU kernels' training call is not available here")
    print(f"# narrow_threads_ab.py --threads {args.threads} --samples {args.samples}; torch {torch.__version__}; "
          "microseconds, medians: rule off / on / on:off")  # fmt: skip
    try:
        for shape in SHAPES:
            x, dy = torch.randn(*shape), torch.randn(*shape)
            xg = x.clone().requires_grad_()
            layer = bnlab.BatchNorm1d(shape[1])
            params = list(layer.parameters())
            calls = {"forward": (lambda: layer(x), 400),
                     "step": (lambda: torch.autograd.grad(layer(xg), [xg, *params], dy), 200)}  # fmt: skip
            cells = []
            for name, (fn, n) in calls.items():
                found: dict[str, list[float]] = {"off": [], "on": []}
                for r in range(args.samples):
                    for key in ("off", "on") if r % 2 else ("on", "off"):
                        _set_rule(backend, 0 if key == "off" else cpu.NARROW_CHANNEL_VALUES)
                        fn(), fn()
                        found[key].append(sample_seconds(fn, n) * 1e6)
                off, on = statistics.median(found["off"]), statistics.median(found["on"])
                cells.append(f"{name} {off:6.1f} / {on:6.1f} / {on / off:.2f}")
            print(f"{str(shape):12s} " + "  ".join(cells), flush=True)
    finally:
        _set_rule(backend, cpu.NARROW_CHANNEL_VALUES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
