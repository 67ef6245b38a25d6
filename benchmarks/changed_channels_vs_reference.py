"""Where two builds of the CPU kernels disagree, which is nearer the float64 reference?

Claim checked (forty-eighth session): the float64 re-sum of gradient sums that overflowed in
float32 changes only channels whose old weight gradient was not finite, and brings each within a
small relative error of the float64 reference. Runs compare_builds.py's cases (training forward
and backward on both builds), and for every channel whose weight gradient differs between the
builds compares both with reference.backward on that channel alone:

    PYTHONPATH=src:benchmarks python benchmarks/changed_channels_vs_reference.py --old <other build's .so>

Prints one line: channels changed, how many the new build has nearer the reference, the worst
relative error of the new build's weight gradient there. A changed channel holding a non-finite
value fails the run (the re-sum must leave those to the other fix-ups).

With ``--result dx`` (forty-ninth session: dx recomputed in float64 where its float32 coefficients
fell below the normal range), the channels whose input gradient differs are compared instead, each
build's dx against reference.backward's with that channel's weight, as the largest error over the
channel relative to the reference's largest |dx| there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import compare_builds as cb
from bnlab import reference as ref
from bnlab.backends import cpu_build


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="another build of the kernel module")
    p.add_argument("--result", choices=("dweight", "dx"), default="dweight",
                   help="the result compared (default dweight)")
    args = p.parse_args(argv)
    if not args.old.is_file():
        p.error(f"--old: expected another build of the kernel module (.so), got {str(args.old)!r}, which is not a file")
    new, old = cpu_build.load(), cpu_build._load_module(args.old)
    changed = nearer = 0
    worst = 0.0
    for shape, dtype, data, cl, nt in cb.cases():
        x = cb.make(tuple(shape), dtype, data, 1, cl)
        dy = cb.make(tuple(shape), dtype, "normal", 2, cl)
        a, b = cb.run(old, x, dy, nt), cb.run(new, x, dy, nt)
        if args.result == "dx":
            found = _changed_dx_channels(a, b, x, dy)
            changed, nearer, worst = changed + found[0], nearer + found[1], max(worst, found[2])
            continue
        if cb.same_bits(a["dweight"], b["dweight"]):
            continue
        xs, dys = x.double().numpy(), dy.double().numpy()
        for c in range(x.shape[1]):
            if cb.same_bits(a["dweight"][c : c + 1], b["dweight"][c : c + 1]):
                continue
            xc, dc = np.take(xs, [c], axis=1), np.take(dys, [c], axis=1)
            if not (np.isfinite(xc).all() and np.isfinite(dc).all()):
                raise SystemExit(f"a channel holding a non-finite value changed: {shape} {dtype} {data} channel {c}")
            changed += 1
            _, cache = ref.forward_train(xc, np.ones(1), np.zeros(1), 1e-5)
            want = ref.backward(dc, cache)[1][0]  # Σdy·x̂: the same whatever the weight
            got_new, got_old = float(b["dweight"][c]), float(a["dweight"][c])
            err = abs(got_new - want) / max(1.0, abs(want))
            worst = max(worst, err)
            nearer += not (np.isfinite(got_old) and abs(got_old - want) <= abs(got_new - want))
    print(f"channels changed {changed}: nearer the float64 reference with the new build {nearer}, "
          f"not nearer {changed - nearer}; worst relative {args.result} error of the new build {worst:.2e}")


def _changed_dx_channels(a: dict, b: dict, x, dy) -> tuple[int, int, float]:
    """(channels whose dx differs between the builds' results a and b, of them those where b's dx
    is nearer the reference, b's worst error relative to the reference's largest |dx| there)."""
    if cb.same_bits(a["dx"], b["dx"]):
        return 0, 0, 0.0
    weight = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(7)) + 0.5).double().numpy()  # cb.run's
    xs, dys = x.double().numpy(), dy.double().numpy()
    changed = nearer = 0
    worst = 0.0
    for c in range(x.shape[1]):
        old_dx, new_dx = a["dx"].select(1, c), b["dx"].select(1, c)
        if cb.same_bits(old_dx, new_dx):
            continue
        xc, dc = np.take(xs, [c], axis=1), np.take(dys, [c], axis=1)
        if not (np.isfinite(xc).all() and np.isfinite(dc).all()):
            raise SystemExit(f"a channel holding a non-finite value changed its dx: {tuple(x.shape)} channel {c}")
        changed += 1
        _, cache = ref.forward_train(xc, weight[c : c + 1], np.zeros(1), 1e-5)
        want = ref.backward(dc, cache)[0][:, 0]
        scale = max(float(np.abs(want).max()), np.finfo(np.float64).tiny)
        err_new = float(np.abs(new_dx.double().numpy() - want).max()) / scale
        err_old = float(np.abs(old_dx.double().numpy() - want).max()) / scale
        worst = max(worst, err_new)
        nearer += err_new < err_old or not np.isfinite(err_old)
    return changed, nearer, worst


if __name__ == "__main__":
    main()
