"""Time bnlab's reduce kernels under other program counts on a GPU: the data for triton_plan.PROGRAMS_PER_SM.

Claim measured (docs/benchmarks.md, *GPU (Triton)*): how many programs per multiprocessor the
statistics and gradient-sum kernels need to keep the memory busy. The plan splits each channel
into segments until channels x segments reaches PROGRAMS_PER_SM x the multiprocessors (4 so
far, a guess); how many programs an SM holds at once depends on the compiled kernel's registers
(printed here), so too few programs leave SMs idle or run a second, partial wave.

How: for each case (shape x layout x dtype) and each count, the two reduce kernels run alone,
interleaved across the counts as bench_bn.py interleaves contenders (GB/s: statistics read x,
N bytes; gradient sums read dy and x, 2N). Each count's forward and backward outputs are first
compared with the default count's (triton_tune's comparison). The best count per layout is the
one with the least geometric mean time over that layout's cases and both kernels.

    python benchmarks/triton_programs.py --shapes gpu-112,gpu-56 --per-sm 2,3,4,5,6,8,12   # on a GPU

--row-fit also times the reduce kernels on NCHW rows in tiles fitted to their length
(triton_plan.ROW_FIT: 3136-value rows in tiles of 256 instead of 1024) against the default tiles,
after the same comparison of outputs; "row fit better: yes" when they take under 0.98 of the time.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bn import SHAPES, time_interleaved  # noqa: E402
from bench_cases import DTYPES, make_input, refuse_unknown_names  # noqa: E402
from triton_tune import KERNEL_TRAFFIC, _agrees, _kernels, _outputs  # noqa: E402

REDUCE = ("stats", "grad_sums")


def _plan_with(x, setting: str, value):
    """The plan of x with triton_plan's module setting ``setting`` (PROGRAMS_PER_SM, ROW_FIT) at
    ``value``; the setting is put back as it was."""
    from bnlab.backends import triton_plan

    before = getattr(triton_plan, setting)
    setattr(triton_plan, setting, value)
    try:
        return triton_plan.plan(x)
    finally:
        setattr(triton_plan, setting, before)


def run_case(shape_name: str, layout: str, dtype_name: str, counts: list[int], rounds: int) -> dict:
    """{"gbps": {count: {kernel: GB/s}}, "segments": {count: segments}, "rejected": {count: why}}."""
    from bnlab.backends import triton_ops as ops

    x = make_input(SHAPES[shape_name], layout, DTYPES[dtype_name], "cuda")
    dy = make_input(SHAPES[shape_name], layout, DTYPES[dtype_name], "cuda", seed=1)
    plans = {count: _plan_with(x, "PROGRAMS_PER_SM", count) for count in counts}
    default = ops.plan(x)
    reference = _outputs(ops, x, dy, default)
    rejected = {}
    for count, p in plans.items():
        problem = None if p == default else _agrees(_outputs(ops, x, dy, p), reference, x.dtype)
        if problem is not None:
            rejected[count] = problem
    timed = {count: p for count, p in plans.items() if count not in rejected}
    return {"gbps": _reduce_gbps(ops, x, dy, timed, rounds), "segments": {c: p.segments for c, p in plans.items()},
            "rejected": rejected}  # fmt: skip


def _reduce_gbps(ops, x, dy, plans: dict, rounds: int) -> dict:
    """{label: {kernel: GB/s}}: the two reduce kernels alone under each labelled plan, interleaved."""
    fns = {}
    for label, p in plans.items():
        kernels = _kernels(ops, x, dy, p)
        fns.update({(name, label): kernels[name] for name in REDUCE})
    seconds = time_interleaved(fns, x.device.type, rounds, 0.02)
    nbytes = x.numel() * x.element_size()
    gbps: dict = {}
    for (kernel, label), s in seconds.items():
        gbps.setdefault(label, {})[kernel] = KERNEL_TRAFFIC[kernel] * nbytes / s / 1e9
    return gbps


def run_row_fit(shape_name: str, dtype_name: str, rounds: int) -> dict | None:
    """The reduce kernels alone on NCHW rows in tiles fitted to their length (triton_plan.ROW_FIT)
    against the default tiles: {"gbps": {"default"|"fit": {kernel: GB/s}}, "widths": (BLOCK_L, BLOCK_L),
    "rejected": why or None}; None when the fitted plan is the default one."""
    from bnlab.backends import triton_ops as ops

    x = make_input(SHAPES[shape_name], "nchw", DTYPES[dtype_name], "cuda")
    dy = make_input(SHAPES[shape_name], "nchw", DTYPES[dtype_name], "cuda", seed=1)
    default, fit = _plan_with(x, "ROW_FIT", False), _plan_with(x, "ROW_FIT", True)
    if fit == default:
        return None
    widths = (default.block_b, fit.block_b)
    try:
        problem = _agrees(_outputs(ops, x, dy, fit), _outputs(ops, x, dy, default), x.dtype)
    except Exception as exc:  # a variant the compiler or the GPU refuses: reported, not fatal
        problem = f"{type(exc).__name__}: {exc}"[:300]
    if problem is not None:
        return {"gbps": {}, "widths": widths, "rejected": problem}
    gbps = _reduce_gbps(ops, x, dy, {"default": default, "fit": fit}, rounds)
    return {"gbps": gbps, "widths": widths, "rejected": None}


def registers() -> list[str]:
    """"name: registers" of each compiled reduce kernel launched so far (triton_launch remembers them)."""
    from bnlab.backends import triton_launch

    seen = set()
    for compiled, _ in triton_launch._COMPILED.values():
        name = getattr(compiled, "name", "?")
        if name.startswith(("stats_n", "grad_n")):
            seen.add(f"{name}: {getattr(compiled, 'n_regs', '?')} registers, {getattr(compiled, 'n_spills', '?')} spills")
    return sorted(seen)


def row_fit_report(args) -> None:
    """Prints each NCHW case's reduce kernels under fitted rows against the default tiles, then the
    geometric mean of the time ratio and "row fit better: yes" or "no" (the GPU round reads it)."""
    ratios = []
    for shape_name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            case = run_row_fit(shape_name, dtype_name, args.rounds)
            if case is None:
                print(f"row fit {shape_name}/nchw/{dtype_name}: the same tiles")
                continue
            head = f"row fit {shape_name}/nchw/{dtype_name}: BLOCK_L {case['widths'][0]} -> {case['widths'][1]}"
            if case["rejected"]:
                print(f"{head}: REJECTED {case['rejected']}")
                continue
            before, after = case["gbps"]["default"], case["gbps"]["fit"]
            print(head + "; GB/s " + "  ".join(f"{k} {before[k]:.0f} -> {after[k]:.0f}" for k in REDUCE))
            ratios.extend(before[k] / after[k] for k in REDUCE)
    if ratios:
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"row fit: time vs the default tiles (geometric mean over the reduce kernels): {mean:.3f}")
        print(f"row fit better: {'yes' if mean < 0.98 else 'no'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpu-112,gpu-56")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--per-sm", default="2,3,4,5,6,8,12", help="comma-separated program counts per multiprocessor")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--row-fit", action="store_true",
                   help="also time the reduce kernels on NCHW rows in tiles fitted to their length (triton_plan.ROW_FIT)")
    args = p.parse_args(argv)
    try:
        counts = [int(v) for v in args.per_sm.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.error(f"--per-sm: expected comma-separated positive integers such as 2,4,8, got {args.per_sm!r}")
    refuse_unknown_names(p, args, {"shapes": SHAPES, "dtypes": DTYPES, "layouts": ("nchw", "cl")})
    if not torch.cuda.is_available():
        p.error("a CUDA device is needed (this script times GPU kernels)")
    print(f"# triton_programs.py --per-sm {args.per_sm}; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ratios: dict = {}  # layout -> count -> [time / the default count's time]
    for shape_name in args.shapes.split(","):
        for layout in args.layouts.split(","):
            for dtype_name in args.dtypes.split(","):
                case = run_case(shape_name, layout, dtype_name, counts, args.rounds)
                print(f"{shape_name}/{layout}/{dtype_name}: GB/s per count (segments per channel)")
                for count in counts:
                    if count in case["rejected"]:
                        print(f"  {count:3d} REJECTED {case['rejected'][count]}")
                        continue
                    cells = "  ".join(f"{k} {case['gbps'][count][k]:7.0f}" for k in REDUCE)
                    print(f"  {count:3d} ({case['segments'][count]:4d})  {cells}")
                base = case["gbps"].get(4) or next(iter(case["gbps"].values()))
                for count, row in case["gbps"].items():
                    ratios.setdefault(layout, {}).setdefault(count, []).extend(base[k] / row[k] for k in REDUCE)
    if args.row_fit:
        row_fit_report(args)
    print("\n".join(registers()))
    for layout, by_count in ratios.items():
        full = {c: r for c, r in by_count.items() if len(r) == max(len(v) for v in by_count.values())}
        means = {c: math.exp(sum(map(math.log, r)) / len(r)) for c, r in full.items()}
        ranked = sorted(means.items(), key=lambda item: item[1])
        print(f"{layout}: time vs 4 per SM (geometric mean): " + "  ".join(f"{c}={m:.3f}" for c, m in ranked))
        print(f"best programs per SM, {layout}: {ranked[0][0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
