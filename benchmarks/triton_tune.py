"""Time bnlab's Triton kernels under other tiles and warps on a GPU: the data for triton_plan.GPU_TILES.

Claim measured (docs/benchmarks.md, "GPU kernels"): which tile sizes and warps per program make
each kernel family fastest. GPU_TILES holds first guesses; a GPU session is short, so this
measures the alternatives in one call and prints the line to put there.

How: for each case (shape x layout x dtype) every candidate's four bandwidth-bound kernels run
alone, interleaved across candidates as bench_bn.py interleaves contenders: the statistics (read x:
N bytes), normalize (read x, write y: 2N), the gradient sums (read dy and x: 2N) and the input
gradient (read dy and x, write dx: 3N), with copy_ of x (2N) as the ceiling. Before any timing,
each candidate's forward and backward outputs are compared with the default tiles' (a candidate
that computes something else is dropped and reported). A family's best candidate is the one with
the least geometric mean time over the cases, relative to the default; the reduce kernels
(statistics, gradient sums) and the elementwise ones (normalize, input gradient) are chosen apart.
One JSON line per case, written atomically; a rerun resumes (--fresh to start over).

    python benchmarks/triton_tune.py --out tune.jsonl                  # on a GPU
    TRITON_INTERPRET=1 python benchmarks/triton_tune.py --dry-run      # the plumbing, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import SHAPES, save, time_interleaved  # noqa: E402
from bench_cases import DTYPES, make_input, refuse_unknown_names  # noqa: E402
from bnlab.backends.triton_plan import parse_tiles  # noqa: E402  (torch only)

#: (reduce_tile, reduce_warps, elementwise_tile, elementwise_warps, width, unroll): the default
#: first, then other tiles per step of the reduce kernels (16-bit and channels-last inputs: NCL
#: ones of 32 and 64 bits take one), then 8 or 16 values per thread (tile / (32 x warps)) in tiles
#: from 1024 to 8192 values. 32 values per thread (4096 at 4 warps, 8192 at 8) spilled 900+ bytes
#: in the compile check (tests/triton_compile_worker.py --tiles, Triton 3.6, sm_90): not tried.
CANDIDATES = (
    "2048,4,2048,4,1024,4",
    "2048,4,2048,4,1024,2",
    "2048,4,2048,4,1024,1",
    "2048,8,2048,8,1024,4",
    "4096,8,4096,8,1024,4",
    "1024,4,1024,4,1024,4",
    "8192,16,8192,16,2048,4",
)
#: bytes moved per element of x by each kernel alone
KERNEL_TRAFFIC = {"stats": 1, "normalize": 2, "grad_sums": 2, "grad_input": 3, "copy_": 2}
FAMILY = {"stats": "reduce", "grad_sums": "reduce", "normalize": "elementwise", "grad_input": "elementwise"}


def _kernels(ops, x, dy, p) -> dict:
    """{kernel name: zero-argument launch} for one plan; inputs of the right shapes, values irrelevant."""
    c = p.c
    coef = torch.rand(3, c, device=x.device)
    gcoef = torch.rand(5, c, device=x.device)  # hi, kk, a, cc, gh (grad_input_kernel)
    hi = coef[0].contiguous()
    stats = torch.rand(3, c, dtype=torch.float64, device=x.device) + 0.5
    if ops.merge_in_tiles(p):  # NCL: the input gradient merges the partial sums in its tiles
        part = torch.rand(p.segments, c, 2, dtype=torch.float64, device=x.device)
        sums = torch.empty(2, c, dtype=torch.float64, device=x.device)
        grad_input = lambda: ops._grad_input_merged(dy, x, part, stats, None, sums, p)  # noqa: E731
    else:
        grad_input = lambda: ops._grad_input(dy, x, gcoef, p)  # noqa: E731
    return {
        "stats": lambda: ops._partial_stats(x, p),
        "normalize": lambda: ops._normalize(x, coef, p),
        "grad_sums": lambda: ops._partial_grads(dy, x, None, hi, stats, p, True),  # the training backward's
        "grad_input": grad_input,
    }


def _outputs(ops, x, dy, p) -> list[torch.Tensor]:
    """What the public ops compute under plan p: y and the statistics, dx and the sums."""
    c = p.c
    weight, bias = torch.linspace(0.5, 1.5, c, device=x.device), torch.linspace(-0.2, 0.2, c, device=x.device)
    y, stats, coef, _ = ops.forward_train(x, weight, bias, 1e-5, p=p)
    dx, sums, _ = ops.backward(dy, x, stats, coef[0].contiguous(), weight, p=p)
    return [y.float(), stats, dx.float(), sums]


def _agrees(ours: list[torch.Tensor], default: list[torch.Tensor], dtype: torch.dtype) -> str | None:
    """None if the outputs match the default tiles' within rounding, else what differs.

    The float64 statistics and sums, and float32 outputs, within 1e-4 of their largest value; y and
    dx of a 16-bit input within one unit of that dtype's last place (another tile's float32 partial
    sums may round the same value to its neighbour: 2.5e-4 of the largest dx in bfloat16 was seen).
    """
    for name, a, b in zip(("y", "statistics", "dx", "gradient sums"), ours, default):
        scale = float(b.abs().max()) or 1.0
        worst = float((a.double() - b.double()).abs().max()) / scale
        tol = torch.finfo(dtype).eps if name in ("y", "dx") and dtype.itemsize < 4 else 1e-4
        if not worst <= tol:  # NaN fails too
            return f"{name} differs from the default tiles' by {worst:.2e} of its largest value (tolerance {tol:.1e})"
    return None


def run_case(key: dict, candidates: list[str], args) -> dict:
    from bnlab.backends import triton_ops as ops

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    shape = args.dry_shape if args.dry_run else SHAPES[key["shape"]]
    x = make_input(shape, key["layout"], DTYPES[key["dtype"]], device)
    dy = make_input(shape, key["layout"], DTYPES[key["dtype"]], device, seed=1)
    nbytes = x.numel() * x.element_size()
    plans = {text: ops.plan(x, for_gpu=not args.dry_run, tiles=ops.parse_tiles(text)) for text in candidates}
    default = _outputs(ops, x, dy, plans[candidates[0]])
    rejected, fns = {}, {}
    for text, p in plans.items():
        try:
            problem = _agrees(_outputs(ops, x, dy, p), default, x.dtype)
        except Exception as exc:  # a candidate the compiler or the GPU refuses: report it, keep going
            problem = f"{type(exc).__name__}: {exc}"[:300]
        if problem is not None:
            rejected[text] = problem
            continue
        fns.update({f"{name}@{text}": fn for name, fn in _kernels(ops, x, dy, p).items()})
    dst = torch.empty_like(x)
    fns["copy_"] = lambda: dst.copy_(x)
    seconds = time_interleaved(fns, device, args.rounds, args.min_sample)
    results = {
        name: {"ms": round(s * 1e3, 4), "GBps": float(f"{KERNEL_TRAFFIC[name.split('@')[0]] * nbytes / s / 1e9:.4g}")}
        for name, s in seconds.items()
    }
    return {**key, "shape_dims": list(shape), "device": device, "results": results, "rejected": rejected}


def best_tiles(records: list[dict], candidates: list[str]) -> tuple[str, dict]:
    """(the Tiles text combining each family's fastest candidate, {family: [(candidate, geomean ratio)]}).

    Ratio: a candidate's time over the default's (the first candidate), geometric mean over the
    cases and the family's kernels; only candidates timed in every case compete.
    """
    ranking = {}
    for family in ("reduce", "elementwise"):
        kernels = [k for k, f in FAMILY.items() if f == family]
        scores = []
        for text in candidates:
            logs = []
            for rec in records:
                res = rec["results"]
                for k in kernels:
                    ours, reference = res.get(f"{k}@{text}"), res.get(f"{k}@{candidates[0]}")
                    if ours is None or reference is None:
                        break
                    logs.append(math.log(ours["ms"] / reference["ms"]))
                else:
                    continue
                logs = []  # missing in a case (rejected there): it does not compete
                break
            if logs:
                scores.append((text, round(math.exp(sum(logs) / len(logs)), 3)))
        ranking[family] = sorted(scores, key=lambda item: item[1])
    fields = {}
    for family, (tile_i, warps_i) in (("reduce", (0, 1)), ("elementwise", (2, 3))):
        chosen = parse_tiles(ranking[family][0][0] if ranking[family] else candidates[0])  # unroll filled in
        fields[family] = (chosen[tile_i], chosen[warps_i], chosen[4], chosen[5])
    # one width serves both families: the reduce family's (its NCL tiles' row length); the unroll
    # is the reduce kernels' alone
    r, e = fields["reduce"], fields["elementwise"]
    return ",".join(str(v) for v in (r[0], r[1], e[0], e[1], r[2], r[3])), ranking



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="gpu-112,gpu-56,conv-56,conv-14",
                   help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--layouts", default="nchw,cl", help="nchw and/or cl (channels_last)")
    p.add_argument("--dtypes", default="fp32", help=f"subset of {list(DTYPES)}")
    p.add_argument("--candidates", default=";".join(CANDIDATES),
                   help="';'-separated Tiles texts (reduce_tile,reduce_warps,elementwise_tile,elementwise_warps,"
                        "width); the first is the reference the others are compared with")  # fmt: skip
    p.add_argument("--rounds", type=int, default=7, help="interleaved samples per kernel and candidate (median)")
    p.add_argument("--min-sample", type=float, default=0.01, help="seconds per sample (calls are repeated)")
    p.add_argument("--out", default="benchmarks/results/triton_tune.jsonl", help="JSON-lines results (resumable)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    p.add_argument("--dry-run", action="store_true", help="no GPU: a tiny input through Triton's interpreter")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds: expected at least 1, got {args.rounds}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is available (--dry-run runs the plumbing through Triton's interpreter)")
    refuse_unknown_names(p, args, {"shapes": SHAPES})
    candidates = [c.strip() for c in args.candidates.split(";") if c.strip()]
    from bnlab.backends import triton_ops

    for text in candidates:
        try:
            triton_ops.parse_tiles(text)
        except ValueError as exc:
            p.error(f"--candidates: {exc}")
    args.dry_shape = (3, 5, 9, 7)  # odd sizes: partial tiles in every dimension
    keys = [{"shape": s, "layout": lay, "dtype": d} for s in args.shapes.split(",")
            for lay in args.layouts.split(",") for d in args.dtypes.split(",")]  # fmt: skip
    if args.dry_run:  # one small input in both layouts
        keys = [{"shape": "dry-run", "layout": lay, "dtype": "fp32"} for lay in ("nchw", "cl")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    command = " ".join(["triton_tune.py"] + (argv if argv is not None else sys.argv[1:]))
    header = {"command": command, "candidates": candidates, "gpu": gpu}
    records = []
    if out.exists() and not args.fresh:
        lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        if lines and lines[0].get("candidates") == candidates:
            records = [rec for rec in lines[1:] if "results" in rec]
    done = {(r["shape"], r["layout"], r["dtype"]) for r in records}
    for key in keys:
        if (key["shape"], key["layout"], key["dtype"]) in done:
            continue
        rec = run_case(key, candidates, args)
        records.append(rec)
        save(out, header, records)
        res = rec["results"]
        print(f"{key['shape']}/{key['layout']}/{key['dtype']}: copy_ {res['copy_']['GBps']} GB/s; "
              f"candidates in the order of --candidates", flush=True)  # fmt: skip
        for kernel in KERNEL_TRAFFIC:
            if kernel != "copy_":
                row = [f"{res[f'{kernel}@{text}']['GBps']:>10.4g}" if f"{kernel}@{text}" in res else f"{'-':>10}"
                       for text in candidates]  # fmt: skip
                print(f"  {kernel:10s} GB/s " + "".join(row), flush=True)
        for text, problem in rec["rejected"].items():
            print(f"  REJECTED {text}: {problem}", flush=True)
    chosen, ranking = best_tiles(records, candidates)
    for family, scores in ranking.items():
        print(f"{family}: time vs {candidates[0]} (geometric mean): " + "  ".join(f"{t}={r}" for t, r in scores))
    print(f"best tiles: {chosen}  (triton_plan.GPU_TILES = Tiles({chosen}); bench_bn.py --triton-tiles {chosen})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
