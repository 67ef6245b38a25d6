"""What the lab's reports say must follow from what was run (a reviewer's reading of `bnlab run`
reports, fifty-fourth session): a cell over fewer runs than the group says so; a partial run's
report claims nothing about conditions that never ran; a quick run says it is too small to show
its claim; measured readings are not fixed text."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import bnlab.lab.runner as runner
from bnlab.lab.cli import main
from bnlab.lab.experiments import get
from bnlab.lab.experiments import small_batch_sync
from bnlab.lab.runs import RunFolder
from bnlab.lab.tables import group_stats, mean_spread


def test_a_cell_over_fewer_runs_than_its_group_says_how_many():
    rows = [{"k": 0, "v": 0.79}, {"k": 0, "v": 0.80}, {"k": 0, "v": None}]  # one diverged: no value
    cell = mean_spread(group_stats(rows, ["k"], "v")[0], as_pct=False)
    assert cell == "0.795 ± 0.005 (0.79–0.8), 2 of 3 runs"
    one = mean_spread(group_stats([{"k": 0, "v": 1000.0}, {"k": 0, "v": math.nan}], ["k"], "v")[0], as_pct=False)
    assert one == "1000, 1 of 2 runs"
    whole = mean_spread(group_stats([{"k": 0, "v": 0.5}, {"k": 0, "v": 0.7}], ["k"], "v")[0])
    assert whole == "60.0 ± 10.0 % (50.0–70.0)"  # every run: as before


def _partial(monkeypatch, name: str, finish, argv=()) -> RunFolder:
    """A quick run of ``name`` interrupted at the first unit that ``finish(unit)`` rejects, and its
    report (`bnlab report DIR`)."""
    exp = get(name)

    def interrupted(unit, ctx):
        if not finish(unit):
            raise KeyboardInterrupt
        return exp.run_unit(unit, ctx)

    with monkeypatch.context() as patched:
        patched.setattr(runner, "get", lambda _: dataclasses.replace(exp, run_unit=interrupted))
        assert main(["run", name, "--quick", *argv]) == 130
    [folder] = runner.Path("runs").iterdir()
    assert main(["report", str(folder)]) == 0  # the report of the partial folder, as a user asks for it
    return RunFolder.open(folder)


def test_a_partial_lr_sweep_says_nothing_of_the_networks_that_never_trained(tmp_path, monkeypatch, capsys):
    # before: "Without BN, no learning rate reaches 90 % ...; it never diverges", and "never" in the
    # steps column, with no plain network trained
    monkeypatch.chdir(tmp_path)
    folder = _partial(monkeypatch, "lr-sweep", lambda unit: unit == "bn")
    report = (folder.path / "report.md").read_text()
    assert "Without BN, no network has finished yet." in report and "With BN, " in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in table[0].strip("|").split("|")], table[1:]
    column = header.index("steps to 90 %, no BN")
    cells = [[c.strip() for c in line.strip().strip("|").split("|")][column] for line in rows]
    assert len(cells) == len(folder.config["params"]["learning_rates"]) and set(cells) == {"–"}  # not "never"


def test_a_partial_batch_size_run_compares_bn_and_groupnorm_only_where_both_ran(tmp_path, monkeypatch):
    # before: "BN is never more than 1 point below GroupNorm" from NaN comparisons, GroupNorm not run
    monkeypatch.chdir(tmp_path)
    folder = _partial(monkeypatch, "batch-size", lambda unit: not unit.startswith("gn"))
    report = (folder.path / "report.md").read_text()
    assert "BN against GroupNorm: no batch size where both have finished yet." in report
    assert "never more than 1 point below" not in report


def test_a_quick_training_run_says_it_cannot_show_the_claim(tmp_path):
    assert main(["run", "regularization", "--quick", "--out", str(tmp_path / "q")]) == 0
    report = (tmp_path / "q" / "report.md").read_text()
    claim_at, note_at = report.index("**The claim.**"), report.index("**Quick version**")
    assert claim_at < note_at < report.index("## What was measured")
    assert "bnlab run regularization` without `--quick`" in report


def test_a_quick_speed_run_says_its_samples_are_few(tmp_path):
    # a reviewer's quick speed run on a busy machine read a 1,694x speed-up, with no word of caution
    assert main(["run", "speed", "--quick", "--shapes", "8,4", "--out", str(tmp_path / "s")]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    assert "> **Quick version**: few, short samples per case" in report and "without `--quick`" in report


def test_regularization_counts_diverged_networks_and_says_whose_losses_are_compared(tmp_path):
    assert main(["run", "regularization", "--quick", "--out", str(tmp_path / "r")]) == 0
    folder = RunFolder.open(tmp_path / "r")
    summary = json.loads((folder.path / "summary.json").read_text())
    rows = summary["rows"]
    # make one network of the BN version a diverged one (as a full run at lr 0.3 had it): no test loss
    victim = next(r for r in rows if r["batchnorm"] and r["dropout"] == 0.0)
    for unit in (folder.path / "units").iterdir():
        data = json.loads(unit.read_text())
        for r in data["rows"]:
            if r == victim:
                r["diverged"], r["test_loss"] = True, None
        unit.write_text(json.dumps(data))
    assert main(["report", str(folder.path)]) == 0
    report = (folder.path / "report.md").read_text()
    assert "| diverged |" in report and "| 1/1 |" in report
    assert f"lr {victim['lr']:g}: " in report and "(the losses of the runs that did not diverge)" in report


def test_inference_scores_whole_batches_and_says_how_many_images(tmp_path):
    assert main(["run", "inference", "--quick", "--out", str(tmp_path / "i")]) == 0
    folder = RunFolder.open(tmp_path / "i")
    table = folder.table("batch_stats")
    assert all(r["images"] == (r["images"] // r["batch_size"]) * r["batch_size"] for r in table)
    report = (folder.path / "report.md").read_text()
    assert "images scored" in report and "whole batches only" in report


@pytest.mark.parametrize("gap, reading", [(1.3e-5, "float32 rounding: the two compute the same function"),
                                         (3e-3, "more than float32 rounding explains")])
def test_the_syncbn_reading_follows_the_measured_gap(gap, reading):
    # before: "(float32 rounding: the two compute the same function)" whatever the gap measured
    assert small_batch_sync.syncbn_reading(gap).startswith(reading)


def test_the_activations_report_reads_both_parts_of_its_claim_from_the_measurement(tmp_path):
    # before: the claim "sigmoids saturate" stood alone, where a full run measured 5.2 % saturated
    # inputs without BN against 4.3 % with it
    from bnlab.lab.experiments import activations

    assert main(["run", "activations", "--quick", "--out", str(tmp_path / "a")]) == 0
    folder = RunFolder.open(tmp_path / "a")
    rows = folder.rows()
    def mean(key, bn):
        values = [r[key] for r in rows if r["batchnorm"] == bn]
        return sum(values) / len(values)

    drift, sat = ({bn: mean(key, bn) for bn in (True, False)} for key in ("median_drift", "saturated_frac"))
    line = next(line for line in (folder.path / "report.md").read_text().splitlines() if line.startswith("Measured"))
    assert f"drifted {drift[False]:.3g} without BN against {drift[True]:.3g} with it" in line
    assert f"{100 * sat[False]:.1f} % of the inputs ended saturated without BN against {100 * sat[True]:.1f} %" in line
    assert activations._compare(0.052, 0.043) == "about the same"
    assert activations._compare(0.6, 0.19) == "more without BN" and activations._compare(0.1, 0.4) == "less without BN"


def test_a_learning_band_of_one_scale_is_named_as_one():
    """init-sweep's band sentence: one scale is "only at w = …", not "from 0.29 to 0.29 (0.0
    decades)" (a quick run's report, fifty-fifth session); a band of several keeps its decades."""
    from bnlab.lab.experiments.init_sweep import _band_words

    assert _band_words((0.2929, 0.2929)) == "only at w = 0.29"
    assert _band_words((0.004, 0.2929)) == "for w from 0.004 to 0.29 (1.9 decades)"
