"""speed: bnlab's BatchNorm against torch.nn's on this machine, and against a copy of the same bytes.

Issue 5's benchmark in the lab, so that a user who installed bnlab sees with one command how it
compares with the BatchNorm they use today, on their own machine. Each case is a shape (the MLP
activations (256, 100) and (8192, 100), the conv activations of docs/benchmarks.md), a memory
layout, a dtype and a mode (training forward, training forward+backward, eval, and for 4-d shapes
forward+backward of bnlab.BatchNormAct2d against torch.nn's BN then (add and) ReLU); its contenders,
bnlab's layer, torch.nn's and two copies of the same bytes, run in interleaved samples and the
medians are kept (bnlab.lab.speed_cases, bnlab.lab.speed_timing: the code benchmarks/bench_bn.py
runs too, with torch.compile and more shapes). Then two whole networks, ResNet-20 and the
init-sweep's MLP, the same weights with each BN (bnlab.lab.speed_models): a training step and
inference, where the other layers take most of the time. ``--shapes 64,128,28,28 256,512`` times
the user's own shapes instead (and no network). A case is a unit: a killed run keeps the cases
it finished, and ``--resume`` times the rest.

Timings depend on the machine and on what else runs on it; the numbers are this machine's, at
torch's thread count (``torch.get_num_threads()``, which bnlab's kernels follow).
"""

from __future__ import annotations

import copy
import math

import torch

import bnlab
from bnlab.lab import speed_timing
from bnlab.lab.experiments import Experiment
from bnlab.lab.runner import RunContext
from bnlab.lab.runs import RunFolder
from bnlab.lab.speed_cases import SHAPES, measure_case
from bnlab.lab.speed_models import inference_fn, model_input, step_fn, twin_models
from bnlab.lab.tables import markdown_table, with_middle

FULL_SHAPES = ("mlp-small", "mlp-large", "conv-56", "conv-14", "conv-32s", "conv-32l")
QUICK_SHAPES = ("mlp-small", "conv-8")
MODES = ("fwd", "fwdbwd", "eval", "relu_fwdbwd", "addrelu_fwdbwd")
MODE_NAMES = {"fwd": "training forward", "fwdbwd": "training forward+backward", "eval": "eval",
              "relu_fwdbwd": "BN+ReLU forward+backward (`bnlab.BatchNormAct2d` against torch.nn's BN, then ReLU)",
              "addrelu_fwdbwd": "BN+add+ReLU forward+backward (`BatchNormAct2d(residual=True)` against BN, add, ReLU)"}
#: the modes of bnlab.BatchNormAct2d, a 2-d layer: timed on 4-d shapes only
FUSED_MODES = ("relu_fwdbwd", "addrelu_fwdbwd")
#: whole networks (bnlab.lab.speed_models.MODELS) and their batch: ResNet-20 on CIFAR-sized images, the
#: init-sweep's MLP 784-100x5-10
FULL_MODELS = {"resnet20": 128, "mlp": 100}
QUICK_MODELS = {"mlp": 100}
NETWORK_NAMES = {"resnet20": "ResNet-20", "mlp": "MLP 784-100x5-10"}
CALLS = {"step": "training step", "inference": "inference"}


def _params(config: dict) -> dict:
    """The cases' parameters; ``--shapes`` (config["shapes"]) replaces the benchmark's shapes, each
    named by its sizes ("64x128x28x28")."""
    quick, given = config["quick"], config.get("shapes")
    if given:
        shapes = {"x".join(str(d) for d in dims): list(dims) for dims in given}
    else:
        shapes = {name: list(SHAPES[name]) for name in (QUICK_SHAPES if quick else FULL_SHAPES)}
    models = {} if given else dict(QUICK_MODELS if quick else FULL_MODELS)  # --shapes: the user's layers only
    return {"shapes": shapes, "models": models,
            "layouts": ["nchw"] if quick else ["nchw", "cl"], "dtypes": ["fp32"] if quick else ["fp32", "bf16"],
            "modes": list(MODES), "rounds": 4 if quick else 9, "min_sample_s": 0.005 if quick else 0.02}


def _units(config: dict) -> list[str]:
    """Case ids "SHAPE/LAYOUT/DTYPE/MODE" (channels-last, "cl", only for 4-d and 5-d shapes; the fused
    modes only for 4-d ones), then "model/NAME/step" and "model/NAME/inference" for each whole network."""
    p = config["params"]
    cases = [f"{shape}/{layout}/{dtype}/{mode}" for shape, dims in p["shapes"].items() for layout in p["layouts"]
             for dtype in p["dtypes"] for mode in p["modes"]
             if (layout == "nchw" or len(dims) >= 4) and (mode not in FUSED_MODES or len(dims) == 4)]
    return cases + [f"model/{name}/{call}" for name in p.get("models", {}) for call in CALLS]


def _machine(device: torch.device) -> str:
    """The processor that ran the case: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return speed_timing.cpu_model() or "unknown CPU"


def _run_model_unit(unit: str, ctx: RunContext) -> dict:
    """One whole network's training step (SGD, cross-entropy) or inference (eval mode, no_grad), the
    same weights with each BN (and, for inference, bnlab's model with every BN folded into its
    conv or linear layer): a record of the table "models"."""
    _, name, call = unit.split("/")
    p, device = ctx.params, ctx.device
    batch = p["models"][name]
    images, labels = (t.to(device) for t in model_input(name, batch))
    twins = {key: m.to(device) for key, m in twin_models("nchw", name).items()}
    if call == "step":
        fns = {"bnlab": step_fn(twins["bnlab"], images, labels), "torch": step_fn(twins["torch.nn"], images, labels)}
    else:
        folded = bnlab.fold(copy.deepcopy(twins["bnlab"]).eval())  # (fold changes its model in place)
        fns = {"bnlab": inference_fn(twins["bnlab"], images), "torch": inference_fn(twins["torch.nn"], images),
               "bnlab folded": inference_fn(folded, images)}
    samples = speed_timing.interleaved_samples(fns, device.type, p["rounds"], p["min_sample_s"])
    seconds = speed_timing.medians(samples)
    record = {"model": name, "network": NETWORK_NAMES[name], "batch": batch, "call": CALLS[call],
              "threads": torch.get_num_threads(), "machine": _machine(device),
              "bnlab_ms": round(seconds["bnlab"] * 1e3, 4), "torch_ms": round(seconds["torch"] * 1e3, 4),
              "speedup": round(speed_timing.ratio_median(samples, "torch", "bnlab"), 3),
              **_quartiles(speed_timing.ratio_quartiles(samples, "torch", "bnlab")),
              "folded_ms": round(seconds["bnlab folded"] * 1e3, 4) if "bnlab folded" in seconds else None}
    return {"rows": [], "tables": {"models": [record]}}


def _run_unit(unit: str, ctx: RunContext) -> dict:
    if unit.startswith("model/"):
        return _run_model_unit(unit, ctx)
    shape_name, layout, dtype, mode = unit.split("/")
    p, device = ctx.params, ctx.device
    dims = p["shapes"][shape_name]
    m = measure_case(tuple(dims), layout, dtype, mode, device.type, p["rounds"], p["min_sample_s"])
    res, ratios = m["results"], m["ratios"]
    row = {"case": unit, "shape": shape_name, "dims": "x".join(str(d) for d in dims), "layout": layout,
           "dtype": dtype, "mode": mode, "threads": torch.get_num_threads(), "machine": _machine(device),
           "bnlab_ms": res["bnlab"]["ms"], "torch_ms": res["torch"]["ms"], "copy_ms": res["copy_"]["ms"],
           "new_copy_ms": res["copy"]["ms"], "bnlab_GBps": res["bnlab"]["GBps"], "copy_GBps": res["copy_"]["GBps"],
           "speedup": ratios["bnlab_vs_torch"], **_quartiles(m["spread"]["bnlab_vs_torch"]),
           "fraction_of_copy": ratios["bnlab_fraction_of_copy_"],
           **_quartiles(m["spread"]["bnlab_fraction_of_copy_"], "fraction_of_copy")}
    return {"rows": [row]}


def _as_cases(rows: list[dict], device: str) -> list[dict]:
    """The rows in the form bnlab.lab.speed_plot.figure draws (bench_bn.py's records)."""
    return [{"shape": r["shape"], "shape_dims": [int(d) for d in r["dims"].split("x")], "layout": r["layout"],
             "dtype": r["dtype"], "mode": r["mode"], "threads": r["threads"], "device": device,
             "ratios": {"bnlab_vs_torch": r["speedup"], "bnlab_fraction_of_copy_": r["fraction_of_copy"]}}
            for r in rows]


def _figures(folder: RunFolder) -> list[tuple[str, str]]:
    from bnlab.lab.plotting import save_figure
    from bnlab.lab.speed_plot import figure

    rows, config = folder.rows(), folder.config
    cases = _as_cases(rows, "cuda" if str(config.get("device", "cpu")).startswith("cuda") else "cpu")
    machine = rows[0]["machine"]
    env = {"environment": {"cpu": machine, "gpu": machine, "torch": config.get("versions", {}).get("torch", "?")}}
    save_figure(figure(env, cases), folder.path / "speed.png")
    return [("speed.png", "Left: how many times faster than torch.nn's BatchNorm bnlab ran, per case (log scale; "
                          "1 = as fast). Right: bnlab's speed as a fraction of a copy of the same bytes into a buffer "
                          "allocated once (`copy_`). Blue float32, orange bf16; hatched: channels-last.")]


def _cases(n: int) -> str:
    return f"{n} case{'' if n == 1 else 's'}"


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _quartiles(quartiles: list[float], name: str = "speedup") -> dict:
    """A record's NAME_q1 and NAME_q3 (flat: rows are CSV records): the middle half of ratio NAME
    read round by round (speed_timing.ratio_quartiles)."""
    return {f"{name}_q1": round(quartiles[0], 3), f"{name}_q3": round(quartiles[1], 3)}


def _with_middle(record: dict, name: str, unit: str = "") -> str:
    """Ratio ``name`` of a record, then the middle half of its per-round values where the record
    has them (records of runs made before they were kept have not)."""
    middle = (record[f"{name}_q1"], record[f"{name}_q3"]) if f"{name}_q1" in record else None
    return with_middle(record[name], middle, unit)


def _speedup(record: dict) -> str:
    return _with_middle(record, "speedup", "x")


def _folded_ms(record: dict) -> str:
    return "–" if record["folded_ms"] is None else f"{record['folded_ms']:.4g}"


def _model_findings(models: list[dict]) -> list[str]:
    """The whole networks' paragraph and table (empty where no network was timed)."""
    if not models:
        return []
    lines = ["", "Whole networks, the same weights with each BN (a training step: forward, cross-entropy, backward "
             "and an SGD update on one batch of random inputs; inference: eval mode under `no_grad`, also of "
             "bnlab's model with every BN folded into its layer, `bnlab.fold`). There the other layers take most of "
             "the time, so a faster BN moves the whole by less:", "",
             markdown_table(models, [("network", lambda r: r["network"]), ("batch", lambda r: str(r["batch"])),
                                     ("call", lambda r: r["call"]), ("bnlab ms", lambda r: f"{r['bnlab_ms']:.4g}"),
                                     ("torch.nn ms", lambda r: f"{r['torch_ms']:.4g}"),
                                     ("speed-up", _speedup), ("folded ms", _folded_ms)])]
    return lines


#: the minimal traffic speed_cases counts (TRAFFIC, TRAFFIC_GPU), N = the input's bytes
_TRAFFIC_TEXT = {"cpu": "forward and eval 2N (x read, y written), forward+backward 5N (7N with a residual)",
                 "cuda": "on a GPU forward 3N (x read twice, y written), forward+backward 8N (10N with a residual), "
                         "eval 2N"}


def _findings(folder: RunFolder) -> str:
    rows, p, models = folder.rows(), folder.config["params"], folder.table("models")
    on_gpu = str(folder.config.get("device", "cpu")).startswith("cuda")
    if not rows:
        return "No case has finished yet." + "\n".join(_model_findings(models))
    threads = sorted({r["threads"] for r in rows})
    lines = [f"{_cases(len(rows))} on {rows[0]['machine']} ({'/'.join(map(str, threads))} torch "
             f"thread{'' if threads == [1] else 's'}): the time "
             f"of a call of bnlab's BatchNorm against torch.nn's, and against a copy of the same bytes, as medians of "
             f"{p['rounds']} interleaved samples. A speed-up is read round by round, torch.nn's sample over bnlab's "
             f"beside it, and given as the median of the rounds' readings with their middle half in brackets (a "
             f"wide bracket marks a case worth timing again); so are the fractions of a copy. It need not equal "
             f"the ratio of the times given, which are each contender's median. "
             f"GB/s count the bytes a mode must move at least, "
             f"{_TRAFFIC_TEXT['cuda' if on_gpu else 'cpu']}, a copy 2N.", ""]
    for mode in p["modes"]:
        of_mode = [r for r in rows if r["mode"] == mode]
        if not of_mode:
            continue
        slowest = min(of_mode, key=lambda r: r["speedup"])
        of_copy = [r["fraction_of_copy"] for r in of_mode]
        fastest = max(of_mode, key=lambda r: r["speedup"])
        lines.append(f"- **{MODE_NAMES[mode]}**: bnlab {_geometric_mean([r['speedup'] for r in of_mode]):.2f}x "
                     f"torch.nn's speed (geometric mean of {_cases(len(of_mode))}), from {slowest['speedup']:.2f}x "
                     f"({slowest['case']}) to {fastest['speedup']:.2f}x ({fastest['case']}); at "
                     f"{min(of_copy):.2f}-{max(of_copy):.2f} "
                     "of a copy's bandwidth.")
    behind = [r for r in rows if r["speedup"] < 1]
    lines.append("- Cases where torch.nn was faster: " +
                 (", ".join(f"{r['case']} ({r['speedup']:.2f}x)" for r in behind) if behind else "none") + ".")
    lines += ["", "Per case (milliseconds per call; `copy_`: a copy of the same bytes into a buffer allocated once):",
              "",
              markdown_table(rows, [("case", lambda r: f"`{r['case']}`"), ("shape", lambda r: r["dims"]),
                                    ("bnlab ms", lambda r: f"{r['bnlab_ms']:.4g}"),
                                    ("torch.nn ms", lambda r: f"{r['torch_ms']:.4g}"),
                                    ("speed-up", _speedup), ("bnlab GB/s", lambda r: f"{r['bnlab_GBps']:.1f}"),
                                    ("copy_ ms", lambda r: f"{r['copy_ms']:.4g}"),
                                    ("of copy_", lambda r: _with_middle(r, "fraction_of_copy"))]),
              *_model_findings(models),
              "", "The full benchmark (torch.compile as a third contender, more shapes, resumable JSON lines) is "
              "`benchmarks/bench_bn.py` in the repository; docs/benchmarks.md has its results and the machines."]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="speed",
    summary="bnlab's BatchNorm against torch.nn's and a copy of the same bytes on this machine (issue 5's benchmark)",
    runtime="full ~2 min (92 cases and 2 networks, 2 threads), quick ~3 s",
    claim="bnlab's BatchNorm is faster than torch.nn's in training (forward, forward+backward) and in eval, and "
          "runs close to the speed of copying the same bytes; its BN+ReLU layer (BatchNormAct2d) is faster than "
          "torch.nn's BN followed by ReLU (issue 5: on the CPU at least 2.5x torch.nn's "
          "forward+backward over the conv shapes, eval at 90 % of a copy's bandwidth, no case more than 10 % "
          "behind torch.nn).",
    params=_params,
    seeds=((0,), (0,)),
    units=_units,
    run_unit=_run_unit,
    figures=_figures,
    findings=_findings,
    row_noun="case",
    trains=False,
    takes_shapes=True,
)
