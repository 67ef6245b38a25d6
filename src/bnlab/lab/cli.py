"""The `bnlab` command line.

    bnlab list                      every experiment, one line each, with its expected runtime
    bnlab run NAME [options]        run one experiment (or `all`) into runs/NAME-TIMESTAMP/
                                    (--nproc N / torchrun: distributed, --sync-bn: SyncBatchNorm)
    bnlab report DIR                rebuild the figures and report.md of a run folder from its files
    bnlab selfcheck                 compare bnlab's layers with torch.nn's on random data

Errors in the arguments print one line naming the option (set BNLAB_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from bnlab.lab.arg_text import parse_shape, positive_int, seed_int
from bnlab.lab.tables import counted


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from bnlab.backends import describe
    from bnlab.lab.selfcheck import format_rows, run_selfcheck

    rows = run_selfcheck(steps=args.steps, seed=args.seed)
    print(describe())
    print()
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_list(args: argparse.Namespace) -> int:
    from bnlab.lab.experiments import registry

    experiments = registry()
    width = max(len(n) for n in experiments)
    for name, exp in experiments.items():
        print(f"{name:<{width}}  {exp.summary}  [{exp.runtime}]")
    print(f"{'all':<{width}}  every experiment above, one after another (`bnlab run all --quick`: about a minute)")
    return 0


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds: expected at least one integer, got {text!r}")
    if min(seeds) < 0:  # numpy's and torch's generators take none (numpy's error named no option)
        raise ValueError(f"--seeds: expected non-negative integers such as 0,1,2, got {text!r}")
    if max(seeds) >= 2**64:  # torch's generators take 64 bits (beyond, their error named no option)
        raise ValueError(f"--seeds: expected integers below 2**64, got {text!r}")
    return seeds


def _parse_shapes(texts: list[str] | None) -> list[list[int]] | None:
    """--shapes of `run speed`: each N,C[,L], N,C,H,W or N,C,D,H,W, with more than one value per channel."""
    if texts is None:
        return None
    shapes: list[list[int]] = []
    for text in texts:
        try:
            dims = list(parse_shape(text))
        except ValueError as err:
            raise ValueError(f"--shapes: {err}") from None
        if math.prod(dims) // dims[1] < 2:  # training mode normalizes over N and the spatial sizes
            raise ValueError(f"--shapes: expected more than one value per channel (N times the spatial sizes), "
                             f"got {text!r}")
        if dims in shapes:
            raise ValueError(f"--shapes: expected distinct shapes, got {text!r} twice")
        shapes.append(dims)
    return shapes


def _check_device(text: str | None) -> None:
    """--device must name a device this machine's torch can use, checked before any folder is made."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: got {text!r}, but torch {torch.__version__} sees no CUDA GPU on this machine; "
                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device: got {text!r}, but this machine has {counted(count, 'CUDA GPU')} "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device: expected cpu or cuda, got {text!r}")


def _cmd_run(args: argparse.Namespace) -> int:
    from bnlab.lab.world import default_timeout_s, torchrun_group, torchrun_world_size

    _check_device(args.device)

    if args.timeout is not None and not 0 < args.timeout <= _MAX_TIMEOUT_S:  # (NaN fails too)
        # the bound: a process group's timedelta overflowed on inf or 1e300 in every rank
        raise ValueError(f"--timeout: expected a positive number of seconds up to {_MAX_TIMEOUT_S:.0e} (three "
                         f"years), got {args.timeout!r}")
    for option, value in (("--out", args.out), ("--data-dir", args.data_dir)):
        if value is not None and not value.strip():
            # an unset shell variable ($OUT, $DATA) had fallen back to the default folder or data
            raise ValueError(f"{option}: expected a folder, got {value!r}")
    launched = torchrun_world_size()
    if args.name == "all" and (args.nproc is not None or args.sync_bn or launched > 1):
        given = [f"--nproc {args.nproc}"] if args.nproc is not None else []
        given += ["--sync-bn"] if args.sync_bn else []
        given += [f"torchrun's WORLD_SIZE {launched}"] if launched > 1 else []
        option = "--nproc" if args.nproc is not None else "--sync-bn" if args.sync_bn else "torchrun"
        raise ValueError(f"{option}: `run all` runs every experiment as it comes (most in one process), without "
                         f"processes or SyncBatchNorm chosen for all; got {', '.join(given)}; run the distributed "
                         "experiments one by one instead")
    timeout = args.timeout or default_timeout_s(bool(args.quick))
    with torchrun_group(args.device or "cpu", timeout):
        if launched > 1:
            from torch.distributed.elastic.multiprocessing.errors import record

            return record(_run_reporting_argument_errors)(args)  # torchrun's summary shows a crashed rank's traceback
        return _run(args)


def _run_reporting_argument_errors(args: argparse.Namespace) -> int:
    """_run, with argument errors printed and turned into exit status 2 before torchrun's ``record`` sees them."""
    try:
        return _run(args)
    except _ARGUMENT_ERRORS as err:
        return _argument_error(err)


def _run(args: argparse.Namespace) -> int:
    from bnlab.lab.allocator import keep_freed_memory
    from bnlab.lab.experiments import registry
    from bnlab.lab.resume import newest_run
    from bnlab.lab.runner import (TRAINING_OPTIONS, RunInterrupted, RunOptions, default_out, main_progress_note,
                                  run_experiment)
    from bnlab.lab.world import current_world

    keep_freed_memory()  # before any tensor: the convolutions' outputs need not fault in at every step
    opts = RunOptions(quick=args.quick, seeds=_parse_seeds(args.seeds), device=args.device, resume=args.resume,
                      bn=args.bn, dataset=args.dataset, data_dir=args.data_dir, command=args.command_line,
                      nproc=args.nproc, sync_bn=args.sync_bn, timeout_s=args.timeout,
                      shapes=_parse_shapes(args.shapes))
    if args.name != "all":
        folder = run_experiment(args.name, RunOptions(**{**opts.__dict__, "out": Path(args.out) if args.out else None}))
        if current_world("cpu").is_main:
            print(main_progress_note(folder))
        return 0
    if args.dataset is not None:
        raise ValueError(f"--dataset: `run all` runs each experiment on its default dataset, got {args.dataset!r}; "
                         "pass --dataset to a single experiment")
    if args.shapes is not None:
        raise ValueError(f"--shapes: `run all` times the benchmark's shapes, got {' '.join(args.shapes)}; "
                         "pass --shapes to `bnlab run speed`")
    # `all` writes runs/all-TIMESTAMP/NAME/ for each experiment; --resume continues the newest such folder.
    root = Path(args.out) if args.out else (newest_run("all", need_config=False) if args.resume else None) or default_out("all")
    start = time.perf_counter()
    for name, exp in registry().items():
        # an experiment that trains nothing (speed) takes none of the options choosing what trains
        chosen = {} if exp.trains else dict.fromkeys(TRAINING_OPTIONS)
        try:
            folder = run_experiment(name, RunOptions(**{**opts.__dict__, "out": root / name, **chosen}))
        except KeyboardInterrupt as err:
            if isinstance(err, RunInterrupted) or not (root.is_dir() and any(root.iterdir())):
                raise
            # before this experiment's folder exists (its data loading), after earlier ones ran:
            # their units are under root, which the advice names (_interrupted_note)
            raise RunInterrupted(root / name) from err
        print(main_progress_note(folder), flush=True)
    print(f"all: {time.perf_counter() - start:.1f} s in total; reports under {root}/*/report.md")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bnlab.lab.report import write_report

    if not args.dir.strip():  # Path("") is the working directory, as `run` refuses an empty --out
        raise ValueError(f"DIR: expected a run folder, got {args.dir!r}")
    print(write_report(Path(args.dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization: the layer, the reference, the lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the experiments with their expected runtimes")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run an experiment (or all of them) and write figures, tables and a report")
    p.add_argument("name", help="experiment name (see `bnlab list`) or `all`")
    p.add_argument("--quick", action="store_true", default=None, help="small version that runs in seconds")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the experiment's)")
    p.add_argument("--out", help="run folder (default runs/NAME-TIMESTAMP; for `all`, a parent folder)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/NAME-*), redoing only unfinished units")
    p.add_argument("--bn", choices=["bnlab", "torch"], default=None, help="BatchNorm implementation (default bnlab)")
    p.add_argument("--dataset", choices=["mnist", "cifar10", "cifar100"], default=None,
                   help="dataset, for experiments that take several (resnet); default mnist")
    p.add_argument("--data-dir", help="folder with the full dataset (MNIST IDX files or CIFAR pickles); "
                                      "default: the bundled 5,000-image MNIST subset")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N processes on this machine and train with DistributedDataParallel (gloo on CPU, "
                        "NCCL on CUDA; conv, resnet, small-batch-sync); the experiment's batch is split between "
                        "them. Under torchrun, leave it out")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: replace every BN layer with bnlab.SyncBatchNorm")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="distributed runs: seconds a process waits in one collective before it fails "
                        "(default 600, 60 with --quick)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="N,C[,...]",
                   help="speed only: the input shapes to time instead of the benchmark's, each N,C[,L], N,C,H,W "
                        "or N,C,D,H,W, e.g. 64,128,28,28 256,512")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="rebuild the figures and report.md of a run folder from its files")
    p.add_argument("dir", help="a run folder (one holding config.json)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("selfcheck", help="compare bnlab's BatchNorm with torch.nn's on random data")
    p.add_argument("--steps", type=positive_int, default=3, help="training steps per case (default 3)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0; 0 to 2**64 - 1)")
    p.set_defaults(func=_cmd_selfcheck)
    return parser


def _shape_taken_for_an_option(argv: list[str]) -> str | None:
    """The first value after --shapes that starts with a minus and a digit ("-1,3"), or None.
    argparse takes such a value for an option and says "expected at least one argument" or
    "unrecognized arguments", nothing of sizes."""
    if "--shapes" not in argv:
        return None
    for token in argv[argv.index("--shapes") + 1:]:
        if token[:1] == "-":
            return token if token[1:2].isdigit() else None
    return None


def main(argv: list[str] | None = None) -> int:
    """The `bnlab` command line (the console script enters through src/bnlab_console.py, which imports this)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    negative = _shape_taken_for_an_option(argv)
    if negative is not None:
        try:
            _parse_shapes([negative])
        except ValueError as err:  # the message of every other shape that is not positive sizes
            return _argument_error(err)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["bnlab", *argv])
    from bnlab.launch import LocalRanksError

    try:
        return args.func(args)
    except _ARGUMENT_ERRORS as err:
        return _argument_error(err)
    except KeyboardInterrupt as err:  # Ctrl-C: what was finished is on disk; one line, not a traceback
        if os.environ.get("BNLAB_DEBUG"):
            raise
        print(_interrupted_note(args, argv, getattr(err, "folder", None)), file=sys.stderr)
        return 130
    except LocalRanksError as err:  # a rank of `--nproc N` failed: one line per rank, tracebacks with BNLAB_DEBUG=1
        if os.environ.get("BNLAB_DEBUG"):
            raise
        lines = [f"  rank {rank}: {_last_line(text)}" for rank, text in sorted(err.failures.items())]
        print(f"bnlab: error: the distributed run failed ({counted(len(err.failures), 'rank')}); finished units are "
              "kept, continue with --resume (BNLAB_DEBUG=1 shows the tracebacks)\n" + "\n".join(lines), file=sys.stderr)
        return 1


_ARGUMENT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)

#: The largest --timeout taken (seconds): beyond, nothing is gained, and timedelta overflows from ~1e14
_MAX_TIMEOUT_S = 1e8


def _interrupted_note(args: argparse.Namespace, argv: list[str], folder: Path | None) -> str:
    """The line Ctrl-C leaves: where the finished units are and the command that continues them
    (naming the folder: without --out, --resume takes the newest run, which may be another), or
    that nothing was started, where the run folder did not exist yet (runner.RunInterrupted)."""
    if args.command != "run":
        return "\nbnlab: interrupted"
    if folder is None:
        return "\nbnlab: interrupted before any unit ran; no run folder was made"
    out = folder.parent if args.name == "all" else folder
    again = ["bnlab", *argv, *([] if args.resume else ["--resume"]), *([] if args.out else ["--out", str(out)])]
    return f"\nbnlab: interrupted; every unit that finished is saved in {out}: continue with `{shlex.join(again)}`"


def _argument_error(err: Exception) -> int:
    """Print an argument error as one line (re-raise it with BNLAB_DEBUG=1); the exit status is 2."""
    if os.environ.get("BNLAB_DEBUG"):
        raise err
    text = str(err)
    for name, option in _OPTION_OF_ARGUMENT.items():  # the option the user typed, not the loader's argument
        if text.startswith(f"{name}:"):
            text = option + text[len(name):]
    print(f"bnlab: error{_rank_tag()}: {text}", file=sys.stderr)
    return 2


#: The library arguments whose errors reach the command line, and the options that set them
_OPTION_OF_ARGUMENT = {"data_dir": "--data-dir"}


def _rank_tag() -> str:
    """' (rank R of N)' in a process started by torchrun, else ''."""
    from bnlab.lab.world import torchrun_world_size

    size = torchrun_world_size()
    return f" (rank {os.environ['RANK']} of {size})" if size > 1 else ""


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback: the exception and its message."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


if __name__ == "__main__":
    sys.exit(main())
