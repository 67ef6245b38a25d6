"""`bnlab list/run/report`: options, errors, same seed -> same numbers, resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import bnlab.lab.resume as resume
import bnlab.lab.runner as runner
from bnlab.lab.cli import main
from bnlab.lab.experiments import get


def _rows(folder):
    return json.loads((folder / "summary.json").read_text())["rows"]


def test_list_names_every_experiment_with_a_runtime(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["init-sweep", "lr-sweep", "activations", "inference", "conv", "resnet", "regularization",
                     "batch-size", "small-batch-sync", "speed", "all"]
    assert all("[" in line and "s" in line.split("[")[-1] for line in lines[:-1])


@pytest.mark.parametrize("argv,message", [
    (["run", "nope", "--quick"], "experiment: expected one of"),
    (["run", "conv", "--quick", "--seeds", "a,b"], "--seeds"),
    (["run", "conv", "--quick", "--seeds", "1,1"], "--seeds"),
    (["run", "init-sweep", "--quick", "--seeds", "0,-1"], "--seeds: expected non-negative integers"),
    (["run", "init-sweep", "--quick", "--dataset", "cifar10"], "--dataset"),
    (["run", "resnet", "--quick", "--dataset", "cifar10"], "error: --data-dir: cifar10 is not bundled"),
    (["report", "missing-dir"], "config.json"),
    (["report", ""], "error: DIR: expected a run folder, got ''"),
    (["run", "conv", "--quick", "--device", "tpu"], "--device: expected a torch device"),
    (["run", "all", "--quick", "--sync-bn"], "error: --sync-bn: `run all` runs every experiment as it comes"),
    (["run", "all", "--quick", "--nproc", "2"], "error: --nproc: `run all` runs every experiment as it comes"),
    (["run", "conv", "--quick", "--device", "cuda:7"] if torch.cuda.is_available() else
     ["run", "conv", "--quick", "--device", "cuda"], "--device: got"),
])
def test_bad_options_name_the_option(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_same_seed_same_numbers_and_report_rebuilds(tmp_path, capsys):
    argv = ["run", "init-sweep", "--quick", "--seeds", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    report = (tmp_path / "a" / "report.md").read_text()
    (tmp_path / "a" / "report.md").unlink()
    (tmp_path / "a" / "init_sweep_grid.png").unlink()
    assert main(["report", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "report.md").read_text() == report
    assert (tmp_path / "a" / "init_sweep_grid.png").stat().st_size > 10_000


def test_resume_redoes_only_unfinished_units(tmp_path, monkeypatch, capsys):
    exp = get("conv")
    ran = []

    def killed_after_first(unit, ctx):
        if ran:
            raise KeyboardInterrupt  # the run is killed while the second unit trains
        ran.append(unit)
        return exp.run_unit(unit, ctx)

    monkeypatch.setattr(runner, "get", lambda name: dataclasses.replace(exp, run_unit=killed_after_first))
    assert main(["run", "conv", "--quick"]) == 130  # Ctrl-C: one line saying how to go on, no traceback
    err = capsys.readouterr().err
    [folder] = list((tmp_path / "runs").iterdir())
    assert err.strip() == (f"bnlab: interrupted; every unit that finished is saved in runs/{folder.name}: continue "
                           f"with `bnlab run conv --quick --resume --out runs/{folder.name}`")
    assert [p.name for p in (folder / "units").iterdir()] == ["channel,seed=0.json"]
    assert not json.loads((folder / "summary.json").read_text())["complete"]

    def counting(unit, ctx):
        ran.append(unit)
        return exp.run_unit(unit, ctx)

    monkeypatch.setattr(runner, "get", lambda name: dataclasses.replace(exp, run_unit=counting))
    assert main(["run", "conv", "--quick", "--bn", "torch", "--resume"]) == 2  # options differ from the stored run
    capsys.readouterr()
    assert main(["run", "conv", "--quick", "--resume"]) == 0  # no --out: the newest runs/conv-*
    assert f"conv: resuming runs/{folder.name} (quick version): 1 of 3 units already done" in capsys.readouterr().err
    assert ran == ["channel,seed=0", "activation,seed=0", "none,seed=0"]
    monkeypatch.undo()
    assert main(["run", "conv", "--quick", "--out", str(tmp_path / "whole")]) == 0
    assert _rows(folder) == _rows(tmp_path / "whole")  # resumed = uninterrupted, number for number


def test_torch_batchnorm_flag(tmp_path):
    assert main(["run", "inference", "--quick", "--bn", "torch", "--out", str(tmp_path / "t")]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["bn"] == "torch"
    bn_row = next(r for r in _rows(tmp_path / "t") if r["batchnorm"])
    assert "Expected more than 1 value per channel" in bn_row["batch1_error"]  # torch.nn's own message


def test_data_dir_runs_an_experiment_on_mnist_files(tmp_path):
    import gzip

    import numpy as np

    from bnlab.lab.disk_data import MNIST_FILES

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"train": 300, "test": 120}
    for key, name in MNIST_FILES.items():
        n = sizes[key.split("_")[0]]
        array = rng.integers(0, 256, (n, 28, 28)) if key.endswith("images") else rng.integers(0, 10, n)
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        (raw / f"{name}.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    # a relative --data-dir is stored absolute, so that a resume from elsewhere finds the files
    assert main(["run", "regularization", "--quick", "--data-dir", ".", "--out", str(tmp_path / "r")]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path.resolve())
    assert "from " + str(tmp_path.resolve()) in (tmp_path / "r" / "report.md").read_text()
    assert len(_rows(tmp_path / "r")) == 12


def test_resume_of_a_run_that_stored_a_relative_data_dir_takes_the_same_data_dir(tmp_path, monkeypatch):
    # runs made before the forty-ninth session kept --data-dir as typed; given again, it is the same
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    stored = {"experiment": "conv", "quick": True, "seeds": [0], "bn": "bnlab", "dataset": "mnist",
              "data_dir": "mnist", "device": "cpu", "world_size": 1, "sync_bn": False, "shapes": None}
    opts = runner.RunOptions(resume=True, data_dir="mnist", out=tmp_path / "run")
    resume.check_resume(stored, opts, get("conv"), opts.out)  # no error
    other = runner.RunOptions(resume=True, data_dir=str(tmp_path), out=tmp_path / "run")
    with pytest.raises(ValueError, match="data_dir: stored"):
        resume.check_resume(stored, other, get("conv"), other.out)


_STORED_CONV = {"experiment": "conv", "quick": True, "seeds": [0], "bn": "bnlab", "dataset": "mnist", "data_dir": None,
                "device": "cpu", "world_size": 1, "sync_bn": False, "shapes": None}


@pytest.mark.parametrize("option,value,stored", [
    ("quick", False, "True"),
    ("seeds", [1], "[0]"),
    ("bn", "torch", "'bnlab'"),
    ("dataset", "cifar10", "'mnist'"),
    ("nproc", 2, "1"),  # (kept as world_size)
    ("sync_bn", True, "False"),
    ("shapes", [[8, 4]], "None"),
])
def test_resume_refuses_every_option_that_defines_the_run(tmp_path, option, value, stored):
    """Guards resume._IDENTITY: each option that defines what a run computes, given otherwise than
    stored, refuses the resume and is named (a run resumed with other --seeds had mixed two runs' units)."""
    key = "world_size" if option == "nproc" else option
    same = runner.RunOptions(resume=True, out=tmp_path / "run", **{option: _STORED_CONV.get(option, 1)})
    resume.check_resume(_STORED_CONV, same, get("conv"), same.out)  # as stored: no error
    other = runner.RunOptions(resume=True, out=tmp_path / "run", **{option: value})
    message = rf"--resume: the options differ .*\({key}: stored {re.escape(stored)}, given "
    with pytest.raises(ValueError, match=message):
        resume.check_resume(_STORED_CONV, other, get("conv"), other.out)


def test_resume_with_other_seeds_is_refused_before_any_unit_runs(tmp_path, capsys):
    """Guards resume._IDENTITY's "seeds" end to end: `bnlab run --resume --seeds` that differ from the
    stored run exits 2 with the option named, and the folder is left as it was."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({**_STORED_CONV, "units": ["channel,seed=0"]}))
    assert main(["run", "conv", "--quick", "--seeds", "1", "--resume", "--out", str(tmp_path / "run")]) == 2
    assert "(seeds: stored [0], given [1])" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


@pytest.mark.parametrize("need_config", [True, False])
def test_newest_run_is_the_latest_stamped_folder(tmp_path, need_config):
    """Guards resume.newest_run: of runs/NAME-YYYYmmdd-HHMMSS folders the latest stamp (sorted last)
    is taken; with need_config only folders holding a config.json count, without it any folder."""
    root = tmp_path / "runs"
    for stamp in ("20250101-000000", "20240101-000000", "20240601-000000"):
        (root / f"conv-{stamp}").mkdir(parents=True)
        if stamp != "20240601-000000":
            (root / f"conv-{stamp}" / "config.json").write_text("{}")
    (root / "conv-20990101-000000.json").write_text("{}")  # a file, not a run folder
    (root / "resnet-20260101-000000").mkdir()  # another experiment's
    assert resume.newest_run("conv", root, need_config=need_config) == root / "conv-20250101-000000"
    (root / "conv-20251231-000000").mkdir()  # newest, but holding no run yet
    expected = "conv-20250101-000000" if need_config else "conv-20251231-000000"
    assert resume.newest_run("conv", root, need_config=need_config) == root / expected
    assert resume.newest_run("speed", root, need_config=need_config) is None


def test_ctrl_c_before_the_run_folder_exists_gives_no_advice_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the data loads, before the folder is made

    monkeypatch.setattr(runner.lab_data, "load", interrupted)
    assert main(["run", "conv", "--quick"]) == 130
    assert capsys.readouterr().err.strip() == "bnlab: interrupted before any unit ran; no run folder was made"
    assert not (tmp_path / "runs").exists()


def test_run_all_resume_continues_the_newest_all_folder(tmp_path, monkeypatch):
    import bnlab.lab.experiments as experiments

    only = {"regularization": get("regularization")}
    monkeypatch.setattr(experiments, "registry", lambda: only)
    assert main(["run", "all", "--quick"]) == 0
    [root] = list((tmp_path / "runs").glob("all-*"))
    unit_file = root / "regularization" / "units" / "bn.json"
    before = unit_file.stat().st_mtime_ns
    assert main(["run", "all", "--quick", "--resume"]) == 0
    assert list((tmp_path / "runs").glob("all-*")) == [root]
    assert unit_file.stat().st_mtime_ns == before  # finished units are not redone


def test_ctrl_c_while_the_report_is_written_names_the_folder_and_resume_reports(tmp_path, monkeypatch, capsys):
    """Every unit had finished; the note said no run folder was made (the fiftieth session's audit)."""
    import bnlab.lab.report as report

    def interrupted(folder):
        raise KeyboardInterrupt

    write_report = report.write_report
    monkeypatch.setattr(report, "write_report", interrupted)
    out = tmp_path / "r"
    assert main(["run", "regularization", "--quick", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"bnlab: interrupted; every unit that finished is saved in {out}: continue with "
        f"`bnlab run regularization --quick --out {out} --resume`")
    units = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    assert units and not (out / "report.md").exists()
    monkeypatch.setattr(report, "write_report", write_report)
    assert main(["run", "regularization", "--quick", "--out", str(out), "--resume"]) == 0
    assert (out / "report.md").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()} == units  # nothing trained again


def test_run_all_ctrl_c_before_the_next_experiments_folder_names_the_finished_ones(tmp_path, monkeypatch, capsys):
    import bnlab.lab.experiments as experiments

    only = {"regularization": get("regularization"), "conv": get("conv")}
    monkeypatch.setattr(experiments, "registry", lambda: only)
    load = runner.lab_data.load

    def interrupted_for_conv(*args, **kwargs):
        if (tmp_path / "all" / "regularization" / "report.md").exists():
            raise KeyboardInterrupt  # Ctrl-C while conv's data loads, regularization done
        return load(*args, **kwargs)

    monkeypatch.setattr(runner.lab_data, "load", interrupted_for_conv)
    assert main(["run", "all", "--quick", "--out", str(tmp_path / "all")]) == 130
    assert capsys.readouterr().err.strip().endswith(
        f"bnlab: interrupted; every unit that finished is saved in {tmp_path / 'all'}: continue with "
        f"`bnlab run all --quick --out {tmp_path / 'all'} --resume`")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["regularization"]


def test_missing_data_files_leave_no_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", "resnet", "--quick", "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err
    assert err.startswith("bnlab: error: --data-dir: no CIFAR-10 file data_batch_1 under"), err  # the option typed
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where, what", [("nothing", "not there"), ("a-file", "a file, not a folder")])
def test_a_data_dir_that_is_not_a_folder_is_said_so_first(tmp_path, monkeypatch, capsys, where, what):
    # before: the seven paths looked for under it, as if the folder were there but empty
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert main(["run", "init-sweep", "--quick", "--data-dir", where]) == 2
    assert capsys.readouterr().err.strip() == (f"bnlab: error: --data-dir: expected a folder holding the mnist files, "
                                               f"got {str(tmp_path / where)!r}, which is {what}")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_folder_of_another_experiment(tmp_path, capsys):
    assert main(["run", "init-sweep", "--quick", "--out", str(tmp_path / "a")]) == 0
    units = sorted(p.name for p in (tmp_path / "a" / "units").iterdir())
    capsys.readouterr()
    assert main(["run", "lr-sweep", "--quick", "--resume", "--out", str(tmp_path / "a")]) == 2
    assert (f"--out: {tmp_path / 'a'} holds a run of init-sweep, not of lr-sweep; resume it with "
            f"`bnlab run init-sweep --resume --out {tmp_path / 'a'}`") in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "a" / "units").iterdir()) == units


def test_resume_without_a_run_says_it_starts_a_new_one(tmp_path, capsys):
    assert main(["run", "init-sweep", "--quick", "--resume", "--out", str(tmp_path / "new")]) == 0
    assert f"--resume found no run to continue (no run folder at {tmp_path / 'new'}); starting a new one" in \
        capsys.readouterr().err
    assert (tmp_path / "new" / "report.md").is_file()


def test_a_report_of_a_partial_run_with_a_condition_missing(tmp_path):
    # init-sweep with the BN networks not trained yet: its figures had no rows for them (and failed)
    assert main(["run", "init-sweep", "--quick", "--out", str(tmp_path / "p")]) == 0
    (tmp_path / "p" / "units" / "bn.json").unlink()
    assert main(["report", str(tmp_path / "p")]) == 0
    report = (tmp_path / "p" / "report.md").read_text()
    assert "**Partial run**: 1 of 2 units finished" in report
    # nothing is claimed of the networks not trained yet ("no init scale reaches ..." before)
    assert "With BN no network has finished yet" in report and "With BN no init scale" not in report


def test_an_out_folder_that_cannot_be_made_is_named(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["run", "init-sweep", "--quick", "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"--out: expected a folder bnlab can create and write, got {tmp_path / 'afile' / 'sub'}" in err
    assert "Traceback" not in err


def test_processes_that_cannot_share_the_batch_are_refused_before_any_folder(tmp_path, capsys):
    assert main(["run", "conv", "--quick", "--nproc", "3", "--out", str(tmp_path / "n3")]) == 2
    assert "--nproc: conv trains with a global batch of 64, which the processes share equally; expected a number " \
           "of processes that divides it (such as 2, 4, 8, 16), got 3" in capsys.readouterr().err
    assert not (tmp_path / "n3").exists()


@pytest.mark.parametrize("steps", ["0", "-1", "two"])
def test_selfcheck_needs_at_least_one_step(steps, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["selfcheck", "--steps", steps])
    assert exit_.value.code == 2
    assert f"argument --steps: expected a positive integer, got '{steps}'" in capsys.readouterr().err
    from bnlab.lab.selfcheck import run_selfcheck

    with pytest.raises(ValueError, match="steps: expected a positive int"):
        run_selfcheck(steps=0)


@pytest.mark.parametrize("broken", ["nan_output", "no_count"])
def test_selfcheck_fails_a_layer_that_gives_nan_or_counts_no_batch(broken, monkeypatch, capsys):
    """Python's max drops a NaN that is not first: a layer of NaN outputs had passed with every
    row at 0.0 and exit status 0; the batch counter was not compared at all."""
    import bnlab
    from bnlab.lab.selfcheck import _CASES

    layers = {getattr(bnlab, layer) for layer, _ in _CASES}
    for cls in layers:
        forward = cls.forward

        def broken_forward(self, input, *args, _forward=forward, **kwargs):
            y = _forward(self, input, *args, **kwargs)
            if broken == "no_count":
                self.num_batches_tracked.zero_()
                return y
            return y * float("nan")

        monkeypatch.setattr(cls, "forward", broken_forward)
    assert main(["selfcheck", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "SOME CASES EXCEED TOLERANCE" in out and " yes" not in out



def test_selfcheck_seed_past_64_bits_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["selfcheck", "--seed", str(2**64)])
    assert exit_.value.code == 2
    assert f"argument --seed: expected an integer from 0 to 2**64 - 1, got '{2**64}'" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, capsys):
    # two `bnlab run NAME` (no --out) started in one second: the second had been refused, naming an
    # --out that was never given (a reviewer saw it in 2 of 3 tries)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "default_out", lambda name, root="runs": tmp_path / "runs" / f"{name}-20261207-225247")
    argv = ["run", "activations", "--quick", "--seeds", "0"]
    for _ in range(3):
        assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["activations-20261207-225247", "activations-20261207-225247-2", "activations-20261207-225247-3"]
    assert all((tmp_path / "runs" / n / "report.md").is_file() for n in names)
    assert resume.newest_run("activations", tmp_path / "runs") == tmp_path / "runs" / "activations-20261207-225247-3"
    (tmp_path / "runs" / "activations-20261207-225247-10").mkdir()  # numbers compare as numbers, not text
    ((tmp_path / "runs" / "activations-20261207-225247-10") / "config.json").write_text("{}")
    assert resume.newest_run("activations", tmp_path / "runs").name == "activations-20261207-225247-10"
    assert resume.newest_run("activations", tmp_path / "runs", need_config=False).name.endswith("-10")
