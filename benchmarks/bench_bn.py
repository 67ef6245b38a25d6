"""Benchmark bnlab's BatchNorm against torch.nn's (eager and torch.compile'd) and a copy of the same bytes.

Claim measured: bnlab's BN is faster than PyTorch's and close to the memory-bandwidth limit (the
targets of issue 5; results and discussion in docs/benchmarks.md).

How: for each case (shape x layout x dtype x mode), every contender runs in interleaved rounds and
the median of the rounds is reported, so that load from other processes shifts every contender
alike; each round takes another order, in which every contender follows every other equally often
(balanced_orders in bnlab.lab.speed_timing). Milliseconds per call, effective GB/s under the minimal
traffic of the mode (bnlab.lab.speed_cases.TRAFFIC: forward and eval 2N bytes, forward+backward 5N), and the
ratios bnlab/each baseline, each the median of the ratios the rounds read one by one, with their middle
half (measure_case; before the fifty-sixth session the ratio of the medians, in the results files of
those runs). Results go to a JSON-lines file, one line per case, written atomically; a rerun skips
the cases already there (--fresh to start over).

    python benchmarks/bench_bn.py                          # every CPU case, no torch.compile
    python benchmarks/bench_bn.py --compile --modes fwdbwd --dtypes fp32 --layouts nchw
    python benchmarks/bench_bn.py --device cuda --compile --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd
    python benchmarks/bench_bn.py --modes frozen_fwdbwd    # eval-mode layers trained through (frozen BN)
    python benchmarks/bench_bn.py --modes relu_fwdbwd,addrelu_fwdbwd --shapes conv-56,conv-14,conv-32s,conv-32l
                                                           # bnlab.BatchNormAct2d against BN, (add,) ReLU
    python benchmarks/bench_bn.py --plot speed.png         # and the figure of the results (plot_bench.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cases import DTYPES, MODES, refuse_unknown_names  # noqa: E402
import bench_results  # noqa: E402
from bench_env import environment, first_call_seconds  # noqa: E402

from bnlab.lab.speed_cases import CONV, GPU_LARGE, SHAPES, measure_case  # noqa: E402
# time_interleaved: the scripts that time as this one does import it from here
from bnlab.lab.speed_timing import time_interleaved  # noqa: E402,F401
from bnlab.lab.tables import counted, with_middle  # noqa: E402

DEFAULT_SHAPES = {"cpu": [s for s in SHAPES if s not in GPU_LARGE], "cuda": list(SHAPES)}


def run_case(key: dict, args) -> dict:
    shape = SHAPES[key["shape"]]
    measured = measure_case(shape, key["layout"], key["dtype"], key["mode"], args.device, args.rounds, args.min_sample,
                            args.compile)
    return {**key, "shape_dims": list(shape), "device": args.device, "threads": torch.get_num_threads(), **measured}


def _case_id(rec: dict) -> str:
    case = "/".join(str(rec[k]) for k in ("device", "threads", "shape", "layout", "dtype", "mode"))
    case += f"/tiles={rec['triton_tiles']}" if rec.get("triton_tiles") else ""
    case += f"/programs={rec['triton_programs']}" if "triton_programs" in rec else ""
    case += "/row_fit" if rec.get("triton_row_fit") else ""
    return case + (f"/small={rec['triton_small_numel']}" if "triton_small_numel" in rec else "")


def load_done(path: Path) -> dict:
    """{case id: record} of the cases already in a results file ({} where there is none); the last
    record of a case wins. ValueError naming the file (bench_results.read)."""
    if not path.exists():
        return {}
    return {_case_id(rec): rec for rec in bench_results.read(path)[1]}


def save(path: Path, header: dict, records: list[dict]) -> None:
    """Write the whole file to a temporary name, then rename it: a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def summarize(records: list[dict], device: str, threads: int) -> list[str]:
    """The issue's target figures, from whatever cases were measured with this device and thread count."""
    lines = [f"summary: {device}, {counted(threads, 'thread')}"]
    records = [r for r in records if r["device"] == device and r.get("threads") == threads]

    def pick(mode, dtype="fp32", layout="nchw", shapes=CONV):
        return [r for r in records if r["device"] == device and r["mode"] == mode and r["dtype"] == dtype
                and r["layout"] == layout and r["shape"] in shapes]  # fmt: skip

    def geo(values):
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    fb = pick("fwdbwd")
    if fb:
        lines.append(f"fwd+bwd fp32 NCHW conv shapes, geometric mean speed-up: vs torch eager "
                     f"{geo([r['ratios']['bnlab_vs_torch'] for r in fb]):.2f}x"
                     + (f", vs torch.compile {geo([r['ratios']['bnlab_vs_torch.compile'] for r in fb]):.2f}x"
                        if all('bnlab_vs_torch.compile' in r['ratios'] for r in fb) else ""))  # fmt: skip
    # The forward and eval targets, per dtype: a dtype judged alone (the docs once called them met
    # on float32 runs while bf16's in the same files missed both)
    dtypes = sorted({r["dtype"] for r in records}, key=("fp32", "bf16", "fp16", "fp64").index)
    for dtype in dtypes:
        for r in pick("fwd", dtype=dtype, shapes=("conv-56", "conv-32l")):
            lines.append(f"fwd {dtype} NCHW {r['shape']}: {r['results']['bnlab']['GBps']} GB/s effective")
    for dtype in dtypes:
        ev = [r for r in records if r["mode"] == "eval" and r["dtype"] == dtype]
        for key in ("bnlab_fraction_of_copy", "bnlab_fraction_of_copy_"):
            if ev:
                lines.append(f"eval {dtype}, {key}: min {min(r['ratios'][key] for r in ev):.2f}, "
                             f"median {statistics.median(r['ratios'][key] for r in ev):.2f}")  # fmt: skip
        short = [r for r in ev if r["ratios"]["bnlab_fraction_of_copy_"] < 0.9]
        if ev:
            lines.append(f"eval {dtype} cases below 0.90 of copy_: {len(short)} of {len(ev)}"
                         + "".join(f"\n  {_case_id(r)}: {_with_spread(r, 'bnlab_fraction_of_copy_', spec='.2f')}"
                                   for r in short))
    if device == "cuda":
        lines += _gpu_summary(records, geo)
    slow = [r for r in records if r["device"] == device and r["ratios"].get("bnlab_vs_torch", 1) < 1 / 1.1]
    lines.append(f"cases more than 10% slower than torch eager: {len(slow)}"
                 + "".join(f"\n  {_case_id(r)}: {r['ratios']['bnlab_vs_torch']}x" for r in slow))  # fmt: skip
    return lines


def _gpu_summary(records: list[dict], geo) -> list[str]:
    """The issue's GPU targets: bandwidth at >= 200 MB, never slower than torch, NCHW vs cuDNN, fused."""
    lines = []
    large = [r for r in records if r["shape"] in GPU_LARGE and r["mode"] in ("fwd", "fwdbwd", "eval")]
    if large:
        fr = [r["ratios"]["bnlab_fraction_of_copy_"] for r in large]
        lines.append(f"GPU-sized tensors (fwd 3N, fwd+bwd 8N, eval 2N), fraction of copy_ bandwidth: "
                     f"min {min(fr):.2f}, median {statistics.median(fr):.2f} over {len(fr)} cases")  # fmt: skip
    plain = [r for r in records if not r["mode"].endswith("relu_fwdbwd")]
    behind = [r for r in plain if r["ratios"]["bnlab_vs_torch"] < 1.0]
    lines.append(f"cases slower than torch (any margin): {len(behind)} of {len(plain)}"
                 + "".join(f"\n  {_case_id(r)}: {r['ratios']['bnlab_vs_torch']}x" for r in behind))  # fmt: skip
    # torch.nn runs cuDNN for float32 only; bf16 takes PyTorch's native kernels
    # (benchmarks/torch_kernel_names.py), so the cuDNN target is judged on float32 cases
    for mode in ("fwd", "fwdbwd", "eval"):
        nchw = [r["ratios"]["bnlab_vs_torch"] for r in plain if r["mode"] == mode and r["layout"] == "nchw"
                and len(r["shape_dims"]) == 4 and r["dtype"] == "fp32"]  # fmt: skip
        if nchw:
            lines.append(f"{mode} fp32 NCHW 4D vs torch (cuDNN): geometric mean {geo(nchw):.2f}x, min {min(nchw):.2f}x")
    for mode in ("relu_fwdbwd", "addrelu_fwdbwd"):
        fused = [r["ratios"]["bnlab_vs_torch"] for r in records if r["mode"] == mode]
        if fused:
            lines.append(f"{mode} vs torch's unfused sequence: geometric mean {geo(fused):.2f}x, min {min(fused):.2f}x")
    return lines


def _with_spread(rec: dict, key: str, unit: str = "", spec: str = "") -> str:
    """Ratio ``key`` of a record (formatted by ``spec``), then in brackets the middle half of its
    per-round values (measure_case's spread; not in records written before it was kept); "" if
    not timed."""
    ratio = rec["ratios"].get(key)
    return "" if ratio is None else with_middle(ratio, rec.get("spread", {}).get(key), unit, spec)


def _versus(rec: dict, name: str) -> str:
    """bnlab's speed-up over contender ``name``, with its spread (_with_spread)."""
    return _with_spread(rec, f"bnlab_vs_{name}", "x")


def markdown(records: list[dict]) -> str:
    rows = ["| threads | shape | layout | dtype | mode | bnlab ms | GB/s | torch ms | compile ms | copy / copy_ GB/s | vs torch | vs compile | of copy / copy_ |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        res = r["results"]
        comp = res.get("torch.compile", {}).get("ms", "")
        rows.append(f"| {r.get('threads', '')} | {tuple(r['shape_dims'])} | {r['layout']} | {r['dtype']} | {r['mode']} | "
                    f"{res['bnlab']['ms']} | {res['bnlab']['GBps']} | {res['torch']['ms']} | {comp} | "
                    f"{res['copy']['GBps']} / {res['copy_']['GBps']} | {_versus(r, 'torch')} | "
                    f"{_versus(r, 'torch.compile')} | "
                    f"{_with_spread(r, 'bnlab_fraction_of_copy')} / "
                    f"{_with_spread(r, 'bnlab_fraction_of_copy_')} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} "
                   f"(default: all; the GPU-sized {list(GPU_LARGE)} on cuda only)")
    p.add_argument("--layouts", default="nchw,cl", help="nchw (contiguous) and/or cl (channels_last; 4D shapes only)")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"subset of {list(DTYPES)}")
    # BatchNormAct2d's two modes by default too (4-d shapes only): left out, its CPU path ran at
    # 0.28-0.97x torch.nn's BN then ReLU unnoticed until the forty-seventh session
    p.add_argument("--modes", default="fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd", help=f"subset of {list(MODES)}")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd torch.nn BN (slow to compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (bnlab's kernels follow it)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved samples per contender (median reported)")
    p.add_argument("--min-sample", type=float, default=0.02, help="seconds per sample (calls are repeated)")
    p.add_argument("--out", default="benchmarks/results/bench_bn.jsonl", help="JSON-lines results (resumable)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    p.add_argument("--first-call", action="store_true", help="also time compiling bnlab's CPU kernels from scratch")
    p.add_argument("--markdown", action="store_true", help="print a markdown table of all results at the end")
    p.add_argument("--report", action="store_true", help="measure nothing: summarize and tabulate --out as it is")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the results file as a figure (benchmarks/plot_bench.py) into this PNG")
    p.add_argument("--triton-tiles", default=None, help="run bnlab's GPU kernels under these triton_plan.Tiles "
                   "(reduce_tile,reduce_warps,elementwise_tile,elementwise_warps,width; see triton_tune.py)")
    p.add_argument("--triton-small-numel", type=int, default=None,
                   help="largest input (values) of bnlab's one-program GPU kernels (triton_ops.SMALL_NUMEL; 0: never)")
    p.add_argument("--triton-programs", type=int, default=None,
                   help="reduce-kernel programs per multiprocessor (triton_plan.PROGRAMS_PER_SM; see triton_programs.py)")
    p.add_argument("--triton-row-fit", action="store_true",
                   help="NCHW rows in tiles fitted to their length (triton_plan.ROW_FIT; see triton_programs.py --row-fit)")
    args = p.parse_args(argv)
    from bnlab.backends import triton_plan  # torch only: the plan settings below need no triton

    if args.triton_row_fit:
        triton_plan.ROW_FIT = True
    if args.triton_programs is not None:
        if args.triton_programs < 1:
            p.error(f"--triton-programs: expected a positive number of programs per multiprocessor, "
                    f"got {args.triton_programs}")  # fmt: skip
        triton_plan.PROGRAMS_PER_SM = args.triton_programs
    if args.triton_tiles is not None or args.triton_small_numel is not None:
        try:
            from bnlab.backends import triton_ops
        except ImportError as exc:
            p.error(f"--triton-tiles and --triton-small-numel need triton (EXTRAS=triton): {exc}")

        if args.triton_tiles is not None:
            try:
                triton_plan.GPU_TILES = triton_plan.parse_tiles(args.triton_tiles)
            except ValueError as exc:
                p.error(f"--triton-tiles: {exc}")
        if args.triton_small_numel is not None:
            if args.triton_small_numel < 0:
                p.error(f"--triton-small-numel: expected a number of values >= 0, got {args.triton_small_numel}")
            triton_ops.SMALL_NUMEL = args.triton_small_numel
    if args.device == "cuda" and not torch.cuda.is_available() and not args.report:  # a report measures nothing
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.shapes = args.shapes or ",".join(DEFAULT_SHAPES[args.device])
    refuse_unknown_names(p, args, {"shapes": SHAPES, "layouts": ("nchw", "cl"), "dtypes": DTYPES, "modes": MODES})

    out = Path(args.out)
    try:
        done = {} if args.fresh and not args.report else load_done(out)
    except ValueError as exc:
        p.error(f"--out: {exc}")
    if args.report:
        records = list(done.values())
        for threads in sorted({r.get("threads") for r in records if r["device"] == args.device}):
            print("\n".join(summarize(records, args.device, threads)))
        print(markdown(records))
        _plot(args.plot, out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"environment": environment(args.device), "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    if args.first_call:
        header["bnlab_cpu_first_call"] = first_call_seconds()
    print(json.dumps(header, indent=1))
    keys = [
        {"shape": s, "layout": lay, "dtype": d, "mode": m}
        for s in args.shapes.split(",") for lay in args.layouts.split(",") for d in args.dtypes.split(",")
        for m in args.modes.split(",")
        if not (lay == "cl" and len(SHAPES[s]) < 4) and not (m.endswith("relu_fwdbwd") and len(SHAPES[s]) != 4)
    ]  # fmt: skip
    records = list(done.values())
    for key in keys:
        if args.triton_tiles is not None:
            key["triton_tiles"] = args.triton_tiles  # a case of its own: resuming never mixes tiles
        if args.triton_small_numel is not None:
            key["triton_small_numel"] = args.triton_small_numel
        if args.triton_programs is not None:
            key["triton_programs"] = args.triton_programs
        if args.triton_row_fit:
            key["triton_row_fit"] = True
        cid = _case_id({**key, "device": args.device, "threads": torch.get_num_threads()})
        if cid in done:
            continue
        rec = run_case(key, args)
        records.append(rec)
        save(out, header, records)
        res = rec["results"]
        print(f"{cid}: " + "  ".join(f"{n} {v['ms']:.3f} ms {v['GBps']:.1f} GB/s" for n, v in res.items())
              + "  | " + " ".join(f"{k}={v}" for k, v in rec["ratios"].items()), flush=True)  # fmt: skip
    print("\n".join(summarize(records, args.device, torch.get_num_threads())))
    if args.markdown:
        print(markdown(records))
    _plot(args.plot, out)
    return 0


def _plot(png: str | None, results: Path) -> None:
    """With --plot, the figure of the results file (plot_bench.py), written atomically into png."""
    if png is not None:
        import plot_bench

        plot_bench.main([str(results), "--out", png])


if __name__ == "__main__":
    sys.exit(main())
