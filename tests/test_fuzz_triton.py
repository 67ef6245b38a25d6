"""benchmarks/fuzz_triton.py's case function on a fixed seed: a handful of small cases of the Triton
path (run by Triton's interpreter on CPU tensors, as tests/test_triton.py) against torch.nn and
the float64 reference, and that the harness reports a wrong result and a silent fallback."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (see test_triton.py)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_triton  # noqa: E402

SEED = 20260
#: (kind, mode, dtype, layout, shape): both layers, every mode, the three dtypes Triton takes, both
#: layouts (NCL rows and channels-last tiles, masked tails) and a float64 input that the portable
#: backend must take; everything else (options, values, tiles) drawn from the seed
CASES = [
    ("bn1d", "train", "float32", "nchw", [5, 3, 13]),
    ("bn2d", "train", "float32", "cl", [4, 6, 3, 5]),
    ("bn2d", "train", "bfloat16", "nchw", [3, 5, 4, 7]),
    ("bn3d", "train_nograd", "float16", "cl", [2, 7, 2, 3, 2]),
    ("bn2d", "eval_nograd", "float32", "nchw", [3, 5, 6, 7]),
    ("bn1d", "eval_graph", "float32", "cl", [30, 6]),
    ("act", "train", "float32", "nchw", [2, 3, 7, 10]),
    ("act_res", "train", "float32", "cl", [2, 70, 2, 3]),
    ("act_res", "eval_nograd", "float16", "cl", [3, 20, 3, 2]),
    ("bn2d", "train", "float64", "cl", [4, 3, 2, 5]),
]


def _case(i, kind, mode, dtype, layout, shape, **fixed):
    return fuzz_triton.draw_case(SEED, i, max_numel=600, kind=kind, mode=mode, dtype=dtype, layout=layout, shape=shape,
                                 values=fixed.pop("values", "randn"), **fixed)  # fmt: skip


@pytest.mark.parametrize("i", range(len(CASES)))
def test_fixed_seed_cases_pass(i):
    spec = _case(i, *CASES[i])
    dtype = spec["dtype"]
    result = fuzz_triton.run_case(spec)
    assert result["failures"] == [], (spec, result["failures"])
    assert result["checks"] > 5
    if dtype == "float64":
        assert result["kernels"] == []  # declined by Triton, taken by the portable backend
    elif result["checks"]:
        assert result["kernels"], "no Triton kernel ran"


@pytest.mark.parametrize("i", [0, 1, 6, 7])
def test_fixed_seed_cases_with_an_infinite_gradient_pass(i):
    """The same cases with NaN/±inf in the upstream gradient: the gradients' NaN/inf placed as
    torch.nn's (the twenty-ninth session's source failed 12 of the 36 such cases of a campaign)."""
    spec = _case(i, *CASES[i], dy_values="nonfinite")
    result = fuzz_triton.run_case(spec)
    assert result["failures"] == [], (spec, result["failures"])
    assert result["checks"] > 5 and result["kernels"]


def test_a_wrong_output_is_reported(monkeypatch):
    """An output off by 1e-3 (five times the float32 tolerance) is a failure."""
    ops = fuzz_triton._setup()["ops"]
    original = ops.forward_train

    def off(*args, **kwargs):
        y, *rest = original(*args, **kwargs)
        return (y * 1.001 if y is not None else y), *rest

    monkeypatch.setattr(ops, "forward_train", off)
    spec = _case(0, "bn2d", "train", "float32", "cl", [4, 6, 3, 5], steps=1, then_eval=False)
    failures = fuzz_triton.run_case(spec)["failures"]
    assert any(f["check"].endswith("y vs float64 reference") for f in failures), failures


def test_a_silent_fallback_is_reported(monkeypatch):
    """A claimed input that the portable backend computes (correctly) is a failure all the same."""
    backend = fuzz_triton._setup()["backend"]
    monkeypatch.setattr(backend, "supports", lambda x: False)
    spec = _case(1, "bn1d", "train", "float32", "nchw", [5, 3, 13], steps=1, then_eval=False)
    failures = fuzz_triton.run_case(spec)["failures"]
    assert any("Triton path" in f["check"] for f in failures), failures
    assert not any("reference" in f["check"] for f in failures), failures


def test_a_case_is_rebuilt_from_its_spec():
    """A failing case's JSON line holds everything: the same spec gives the same case twice."""
    spec = fuzz_triton.draw_case(SEED, 3, max_numel=600)
    assert spec == fuzz_triton.draw_case(SEED, 3, max_numel=600)
    import json

    assert json.loads(json.dumps(spec)) == spec


def test_nonfinite_values_off_torch_nn_but_on_the_reference_are_torch_nns_error():
    """NaN/±inf placed otherwise than torch.nn's: torch.nn off the reference when bnlab's are the
    float64 reference's (torch_off, as fuzz_kernels.py notes it), a failure when bnlab's are
    neither; the same placement passes."""
    import torch

    inf, nan = float("inf"), float("nan")
    reference = torch.tensor([1.0, -inf, 2.0], dtype=torch.float64)
    cases = [  # (bnlab's, torch.nn's, failures, torch_off)
        (torch.tensor([1.0, -inf, 2.0]), torch.tensor([1.0, nan, 2.0]), 0, 1),
        (torch.tensor([1.0, nan, 2.0]), torch.tensor([1.0, -inf, 2.0]), 1, 0),
        (torch.tensor([1.0, inf, 2.0]), torch.tensor([1.0, nan, 2.0]), 1, 0),
        (torch.tensor([1.0, nan, 2.0]), torch.tensor([3.0, nan, 4.0]), 0, 0),
    ]
    for ours, theirs, failures, off in cases:
        ck = fuzz_triton.Checker()
        ck.placed("dx NaN/inf vs torch.nn", ours, theirs, reference)
        assert (len(ck.failures), ck.torch_off, ck.checks) == (failures, off, 1), (ours, theirs, ck.failures)

