"""What `bnlab run` refuses about its run folders, found by the fiftieth session's kill-and-resume
audit: each of these had trained on silently, mixed runs, or ended in a traceback.

Every case runs the quick `regularization` experiment (two units, about a second) or none.
"""

from __future__ import annotations

import json
import shutil

import pytest

import bnlab.lab.resume as resume
import bnlab.lab.runner as runner
from bnlab.lab.cli import main
from bnlab.lab.runs import RunFolder

ARGV = ["run", "regularization", "--quick"]


@pytest.fixture
def finished(tmp_path):
    """A finished quick regularization run (its folder)."""
    out = tmp_path / "done"
    assert main([*ARGV, "--out", str(out)]) == 0
    return out


def _error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_second_run_on_a_folder_held_by_a_running_one_is_refused(finished, capsys):
    """Two resumes of one folder had both trained the same units (no lock)."""
    capsys.readouterr()
    with RunFolder(finished).writing():
        assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert _error(capsys) == (f"bnlab: error: --out: another bnlab process is running in {finished}; wait for it, "
                              "or choose another --out")
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 0  # let go when the first ends


def test_a_refused_resume_writes_nothing(finished, capsys, monkeypatch):
    """The lock is taken before the resume reads which units are left or notes other code in
    config.json (a refused resume had written its commit into the running run's config)."""
    (finished / "units" / "bn.json").unlink()
    before = (finished / "config.json").read_text()
    monkeypatch.setattr(runner, "_git_commit", lambda: "f" * 40)
    with RunFolder(finished).writing():
        assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert (finished / "config.json").read_text() == before
    assert "other code" not in capsys.readouterr().err


def test_an_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*ARGV, "--out", str(tmp_path / "notes.txt")]) == 2
    assert _error(capsys).startswith(f"bnlab: error: --out: expected a folder bnlab can create and write, got "
                                     f"{tmp_path / 'notes.txt'} (File exists")


def test_a_run_made_meanwhile_by_another_process_is_not_overwritten(tmp_path, monkeypatch):
    """Two fresh runs on one --out at once had both passed the check and both written their config."""
    out = tmp_path / "raced"
    RunFolder.create(out, {"experiment": "regularization", "units": [], "seeds": [0]})
    monkeypatch.setattr(RunFolder, "ensure_new", classmethod(lambda cls, path: cls(path)))  # checked before it existed
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunFolder.create(out, {"experiment": "regularization", "units": [], "seeds": [1]})
    assert json.loads((out / "config.json").read_text())["seeds"] == [0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing left aside


def test_a_unit_file_of_another_unit_is_refused_by_name(finished, capsys):
    """A copied unit file had been taken as the results of the unit its name says."""
    (finished / "units" / "bn.json").write_text((finished / "units" / "plain.json").read_text())
    capsys.readouterr()
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert _error(capsys) == (f"bnlab: error: {finished / 'units' / 'bn.json'}: expected the results of unit 'bn', "
                              "got those of 'plain' (delete it to run that unit again with --resume)")
    (finished / "units" / "bn.json").write_text("{}")
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert "expected the results of unit 'bn', got no unit results" in _error(capsys)


@pytest.mark.parametrize("config", [[], {"experiment": "regularization"}])
def test_a_config_that_is_not_bnlabs_is_refused_by_name(finished, capsys, config):
    (finished / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert f"{finished / 'config.json'}: expected the configuration bnlab wrote" in _error(capsys)


def test_unit_results_without_their_config_are_not_taken_by_a_new_run(finished, capsys):
    """A new run had taken the old unit files as its own, under options they were not made with."""
    (finished / "config.json").unlink()
    capsys.readouterr()
    assert main([*ARGV, "--seeds", "1", "--out", str(finished)]) == 2
    assert _error(capsys) == (f"bnlab: error: --out: {finished} holds unit results but no config.json (a run whose "
                              "configuration was deleted); choose another --out, or delete the folder")


def test_resuming_into_a_folder_that_cannot_be_written_fails_before_training(finished, capsys, monkeypatch):
    """The unit had trained, then its save failed with a traceback (a read-only file system; os.access
    stands in for one here: root may write anywhere else)."""
    (finished / "units" / "bn.json").unlink()
    trained = []
    monkeypatch.setattr(runner, "run_units", lambda *args: trained.append(args))
    monkeypatch.setattr(resume.os, "access", lambda path, mode: str(path) != str(finished / "units"))
    capsys.readouterr()
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 2
    assert _error(capsys) == (f"bnlab: error: --out: expected a folder bnlab can write to continue the run, got "
                              f"{finished} ({finished / 'units'} is not writable)")
    assert trained == []


def test_a_run_resumed_under_other_code_says_so_and_its_report_names_both_commits(finished, capsys, monkeypatch):
    made = json.loads((finished / "config.json").read_text())["git_commit"] or "0" * 40
    config = json.loads((finished / "config.json").read_text())
    config["git_commit"] = made
    (finished / "config.json").write_text(json.dumps(config))
    (finished / "units" / "bn.json").unlink()
    monkeypatch.setattr(runner, "_git_commit", lambda: "f" * 40)
    capsys.readouterr()
    assert main([*ARGV, "--resume", "--out", str(finished)]) == 0
    assert (f"regularization: the run was made at commit {made[:12]}, this is ffffffffffff: the units trained now "
            "come from other code than the finished ones") in capsys.readouterr().err
    assert json.loads((finished / "config.json").read_text())["resumed_with"] == ["f" * 40]
    assert f"git commit: {made}, resumed at {'f' * 40}" in (finished / "report.md").read_text()


@pytest.mark.parametrize("argv,message", [
    ([*ARGV, "--seeds", str(2**64)], f"--seeds: expected integers below 2**64, got '{2**64}'"),
    ([*ARGV, "--timeout", "inf"], "--timeout: expected a positive number of seconds up to 1e+08 (three years), got inf"),
    ([*ARGV, "--out", ""], "--out: expected a folder, got ''"),
    ([*ARGV, "--data-dir", " "], "--data-dir: expected a folder, got ' '"),
])
def test_options_out_of_range_or_empty_are_refused_before_any_folder(tmp_path, capsys, argv, message):
    """A seed past 64 bits and an infinite timeout had failed inside training (the folder left
    behind); an empty --out or --data-dir (an unset shell variable) had taken the defaults."""
    assert main(argv) == 2
    assert _error(capsys) == f"bnlab: error: {message}"
    assert not (tmp_path / "runs").exists()


def test_resume_without_out_takes_the_newest_stamped_run_not_a_named_one(tmp_path, finished, capsys):
    """runs/NAME-baseline sorted after every time stamp and was resumed instead of the newest run."""
    shutil.copytree(finished, tmp_path / "runs" / "regularization-baseline")
    assert main(ARGV) == 0
    [stamped] = [p for p in (tmp_path / "runs").iterdir() if p.name != "regularization-baseline"]
    (stamped / "units" / "bn.json").unlink()
    capsys.readouterr()
    assert main([*ARGV, "--resume"]) == 0
    assert f"resuming runs/{stamped.name} (quick version): 1 of 2 units already done" in capsys.readouterr().err


def test_a_report_of_a_run_stopped_before_its_first_unit_says_nothing_was_measured(tmp_path, monkeypatch, capsys):
    """The inference report had raised IndexError on a folder without finished units."""

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_units", interrupted)
    out = tmp_path / "inference"
    assert main(["run", "inference", "--quick", "--out", str(out)]) == 130
    monkeypatch.undo()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Nothing yet: no unit has finished." in report and "**Partial run**: 0 of" in report


def test_resume_on_another_kind_of_device_is_refused(finished, capsys):
    """--device was no part of a run's identity: a CPU run continued on a GPU (or back) mixed its units."""
    config = json.loads((finished / "config.json").read_text())
    config["device"] = "cuda:0"  # as if made on a GPU
    (finished / "config.json").write_text(json.dumps(config))
    (finished / "units" / "bn.json").unlink()
    capsys.readouterr()
    assert main([*ARGV, "--resume", "--device", "cpu", "--out", str(finished)]) == 2
    assert "device: stored 'cuda:0', given 'cpu'" in _error(capsys)
    assert not (finished / "units" / "bn.json").exists()


def test_a_resume_removes_the_temporary_files_of_interrupted_writes(finished):
    # a Ctrl-C or a kill during an atomic write left its hidden temporary file, which stayed for good
    leftovers = [finished / ".table_early_loss.csv.k2j4x.tmp", finished / "units" / ".seed=0.json.a8f3.tmp",
                 finished / ".regularization.x9q1.png"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"half")
    (finished / "notes.txt").write_text("mine")  # not the run's: stays
    assert main([*ARGV, "--out", str(finished), "--resume"]) == 0
    assert not any(path.exists() for path in leftovers)
    assert (finished / "notes.txt").read_text() == "mine" and (finished / "report.md").is_file()


def test_a_resume_with_another_thread_count_says_so_and_the_report_names_both(tmp_path, monkeypatch, capsys):
    # torch's convolutions round differently on 1 and 2 threads: a run resumed with another count had
    # mixed both into one report that named the first count only
    import dataclasses

    import torch

    exp = runner.get("regularization")

    def interrupted(unit, ctx):
        if unit != exp.units({"quick": True})[0]:
            raise KeyboardInterrupt
        return exp.run_unit(unit, ctx)

    out = tmp_path / "mixed"
    threads = torch.get_num_threads()
    with monkeypatch.context() as patched:
        patched.setattr(runner, "get", lambda _: dataclasses.replace(exp, run_unit=interrupted))
        assert main([*ARGV, "--out", str(out)]) == 130
    capsys.readouterr()
    other = 1 if threads != 1 else 2
    torch.set_num_threads(other)
    try:
        assert main([*ARGV, "--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    made = f"{threads} torch {'thread' if threads == 1 else 'threads'}"
    assert f"the run was made with {made}, this process has {other}" in err
    config = json.loads((out / "config.json").read_text())
    assert config["torch_threads"] == threads and config["resumed_threads"] == [other]
    assert f"({threads} torch thread{'s' if threads != 1 else ''}; units after a resume with {other}," in (
        out / "report.md").read_text()
    assert main([*ARGV, "--out", str(out), "--resume"]) == 0  # the first count again: nothing to say
    assert "the run was made with" not in capsys.readouterr().err
