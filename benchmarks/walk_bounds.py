"""Module-level BN times under the kernels' size bounds: which walk, and whether outputs stream.

Claim measured (docs/benchmark_rounds.md, *Round of 2026-12-02*): on the Xeon VM, streaming outputs of
16 MiB and more (with the channel walk) made the 25 and 67 MB forward+backward faster, while
streaming rows that split cache lines ((128, 256, 14, 14)) made it several times slower. Each
setting runs in its own process (the kernels read the bounds once), optionally on another
checkout's sources (--src, e.g. a `git worktree` of an older revision), float32 NCHW, training
forward, forward+backward and eval under no_grad, medians of --rounds samples.

    PYTHONPATH=src python benchmarks/walk_bounds.py [--src /tmp/old/src] [--threads 2]

Settings: `default` (the bounds the kernels derive themselves), `stream16` (both bounds 16 MiB),
`flat16` (the flat-walk bound 16 MiB, streaming 240 MiB), `stream16-flat240` and `none240` (both
240 MiB: what a 480 MiB last-level cache gave before this round).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (128, 16, 32, 32), (256, 64, 32, 32), (128, 256, 14, 14),
          (64, 128, 28, 28)]  # fmt: skip
MIB = 1 << 20
SETTINGS = {
    "default": {},
    "stream16": {"BNLAB_STREAM_MIN_BYTES": 16 * MIB, "BNLAB_NCL_FLAT_MAX_BYTES": 16 * MIB},
    "flat16": {"BNLAB_STREAM_MIN_BYTES": 240 * MIB, "BNLAB_NCL_FLAT_MAX_BYTES": 16 * MIB},
    "stream16-flat240": {"BNLAB_STREAM_MIN_BYTES": 16 * MIB, "BNLAB_NCL_FLAT_MAX_BYTES": 240 * MIB},
    "none240": {"BNLAB_STREAM_MIN_BYTES": 240 * MIB, "BNLAB_NCL_FLAT_MAX_BYTES": 240 * MIB},
}

CHILD = """
import json, statistics, sys, time, torch, bnlab
shapes, threads, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
def ms(fn):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        samples.append((time.perf_counter() - start) / 10 * 1e3)
    return statistics.median(samples)
out = {}
for shape in shapes:
    x, dy = torch.randn(shape), torch.randn(shape)
    xg = x.clone().requires_grad_()
    train, ev = bnlab.BatchNorm2d(shape[1]), bnlab.BatchNorm2d(shape[1]).eval()
    def step():
        return torch.autograd.grad(train(xg), [xg, train.weight, train.bias], dy)
    def evaluate():
        with torch.no_grad():
            return ev(x)
    out[str(tuple(shape))] = [ms(lambda: train(x)), ms(step), ms(evaluate)]
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
                   help="the bnlab sources to time (default: this checkout's)")  # fmt: skip
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    chosen = args.settings.split(",")
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        p.error(f"--settings: unknown {unknown}; expected a subset of {list(SETTINGS)}")
    if not os.path.isdir(os.path.join(args.src, "bnlab")):
        p.error(f"--src: expected a directory holding the bnlab package, got {args.src!r}")
    print(f"# walk_bounds.py --src {args.src} --threads {args.threads} --rounds {args.rounds}; ms, float32 NCHW")
    print(f"{'setting':17s} {'shape':20s} {'fwd':>8s} {'fwd+bwd':>8s} {'eval':>8s}")
    for name in chosen:
        env = dict(os.environ, PYTHONPATH=args.src, **{k: str(v) for k, v in SETTINGS[name].items()})
        run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES), str(args.threads), str(args.rounds)],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
        for shape, (fwd, fwdbwd, ev) in json.loads(run.stdout).items():
            print(f"{name:17s} {shape:20s} {fwd:8.3f} {fwdbwd:8.3f} {ev:8.3f}", flush=True)


if __name__ == "__main__":
    main()
