"""benchmarks/bench_model_step.py: its twin ResNet-20s compute the same function, and it runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_model_step  # noqa: E402


def test_the_twins_agree_in_training_and_inference():
    """The comparison is fair only if both variants run the same network: same weights, and
    outputs within fp32 tolerance (the BN implementations differ in rounding only)."""
    models = bench_model_step.twin_models("nchw")
    a, b = models["bnlab"], models["torch.nn"]
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        a.train(mode), b.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(a(images), b(images), rtol=1e-4, atol=1e-4)


def test_it_runs_and_prints_both_tables(capsys, keep_threads):
    bench_model_step.main(["--batch", "2", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# bench_model_step.py --model resnet20 --batch 2")
    assert "MALLOC_MMAP_THRESHOLD_=" in lines[0] and "MALLOC_TRIM_THRESHOLD_=" in lines[0]
    assert lines[1].startswith("training step") and "torch.nn/bnlab" in lines[1]
    assert lines[3].startswith("inference") and "bnlab folded" in lines[3]
    assert lines[5].startswith("frozen-BN step") and "torch.nn/bnlab" in lines[5]
    for faults, times in zip(lines[2::2], lines[1::2]):  # a whole number per variant timed above
        counts = faults.strip().removeprefix("page faults in one call: ").split(", ")
        assert faults.strip().startswith("page faults in one call:") and all(c.split()[-1].isdigit() for c in counts)
        assert len(counts) == len(re.findall(r"\d\.\d\d(?!\d)", times))  # the times, not the 3-decimal ratios


def test_the_mlp_twins_agree_and_the_mlp_runs(capsys, keep_threads):
    """--model mlp: the init-sweep's MLP twice with the same weights (five BatchNorm1d of 100
    features each), and the three tables; its rows have no channels-last form (refused by name)."""
    models = bench_model_step.twin_models("nchw", "mlp")
    a, b = models["bnlab"], models["torch.nn"]
    assert [type(m).__name__ for m in a if "BatchNorm" in type(m).__name__] == ["BatchNorm1d"] * 5
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    rows = torch.randn(8, 784, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        a.train(mode), b.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(a(rows), b(rows), rtol=1e-4, atol=1e-4)
    bench_model_step.main(["--model", "mlp", "--batch", "4", "--rounds", "1", "--min-sample", "0", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# bench_model_step.py --model mlp --batch 4") and "MLP 784-100x5-10" in lines[0]
    assert [line.split()[0] for line in lines[1::2]] == ["training", "inference", "frozen-BN"]
    with pytest.raises(SystemExit) as refused:
        bench_model_step.main(["--model", "mlp", "--layout", "cl"])
    assert refused.value.code == 2
    assert "--layout: the MLP's inputs are (batch, 784) rows" in capsys.readouterr().err


def test_a_frozen_bn_step_keeps_the_statistics_and_trains_the_affine_parameters():
    model = bench_model_step.twin_models("nchw")["bnlab"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    bench_model_step.step_fn(model, images, labels, frozen_bn=True)()
    after = model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    affine = [k for k in before if k.endswith(("bn1.weight", "bn1.bias"))]
    assert stats and affine
    assert all(torch.equal(before[k], after[k]) for k in stats)
    assert all(not torch.equal(before[k], after[k]) for k in affine)


def test_a_negative_sample_length_is_refused_by_name(capsys):
    try:
        bench_model_step.main(["--min-sample", "-1"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--min-sample -1 was accepted")
    assert "--min-sample: expected seconds >= 0, got -1.0" in capsys.readouterr().err


def _compiled_regions(fn) -> int:
    """How many compiled graphs one call of fn runs through."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(row.count for row in prof.key_averages() if row.key.startswith("Torch-Compiled Region"))


def test_the_compiled_twin_runs_as_one_graph_beside_the_graph_broken_variant(capsys):
    # With one backend for all three, dynamo's entry for the graph-broken forward also matched the
    # bnlab twin (the twins share their code, and that entry guards only module types): the twin
    # ran in pieces, and the thirteenth round's table measured that.
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 64
    try:
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        fns = bench_model_step.compiled_variants(
            lambda: bench_model_step.twin_models("nchw"),
            lambda m: bench_model_step.inference_fn(m, images),
            backend="aot_eager",
        )
        pieces = {name: _compiled_regions(fn) for name, fn in fns.items()}
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
    assert pieces["bnlab"] == 1 and pieces["torch.nn"] == 1, pieces
    assert pieces[bench_model_step.BREAKS] > 1, pieces
