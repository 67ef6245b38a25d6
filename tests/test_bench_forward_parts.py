"""benchmarks/forward_parts.py and the kernel calls it and kernel_ab.py time (kernel_ab.kernel_calls):
each call computes what its name says, and the script prints its table; kernel_ab.py and
compare_builds.py refuse to time or compare a build against itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_builds  # noqa: E402
import forward_parts  # noqa: E402
import kernel_ab  # noqa: E402
from bnlab.backends import cpu_build  # noqa: E402

LIB = cpu_build.load()
pytestmark = pytest.mark.skipif(
    LIB is None or not hasattr(LIB, "bn_empty"), reason="the CPU kernels' extension module did not build"
)


def _call_and_tensors(mode: str, layout: str):
    """A kernel call of kernel_ab.kernel_calls and the tensors it works on: (x, dy, out, stats, ...)."""
    (call,), tensors = kernel_ab.kernel_calls((LIB,), mode, (4, 8, 5, 5), layout, torch.float32, 2)
    return call, tensors


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_the_timed_calls_compute_the_forward_its_statistics_and_a_normalize(layout):
    fwd, (x, _, out, stats) = _call_and_tensors("fwd", layout)
    fwd()
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(stats[0], x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-9)

    stats_only, (x, _, out, stats) = _call_and_tensors("stats", layout)
    out.fill_(7.0)
    stats_only()
    torch.testing.assert_close(stats[0], x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    assert torch.all(out == 7.0)  # no output written

    normalize, (x, _, out, _) = _call_and_tensors("eval", layout)
    normalize()  # mean 0, invstd 1, no weight or bias: y = x
    assert torch.equal(out, x)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_the_frozen_call_computes_the_eval_mode_backward(layout):
    frozen, (x, dy, out, _, params) = _call_and_tensors("frozen", layout)
    weight = params[0].clone()
    params[1:].fill_(7.0)
    frozen()  # mean 0, invstd 1: dx = dy·weight, dweight = Σdy·x, dbias = Σdy
    torch.testing.assert_close(out, dy * weight.view(1, -1, 1, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(params[1], (dy.double() * x.double()).sum(dim=(0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(params[2], dy.double().sum(dim=(0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(params[0], weight)  # the weight is read, not written


def test_the_script_prints_each_part_and_their_ratio(capsys):
    forward_parts.main(["--shape", "4,8,5,5", "--threads", "1", "--rounds", "2", "--reps", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# forward_parts.py --shape 4,8,5,5 --layout nchw --threads 1")
    names = [line[:20].strip() for line in lines[1:]]
    assert names == ["training forward", "statistics alone", "normalize alone", "copy_", "the two alone, added"]
    assert all(float(line[20:].split()[0]) > 0 for line in lines[1:])
    assert "forward / (the two added)" in lines[-1]


def test_kernel_ab_refuses_builds_it_cannot_time_apart(tmp_path, capsys):
    missing = str(tmp_path / "missing.so")
    with pytest.raises(SystemExit):
        kernel_ab.main(["--old", missing, "eval:4,8,5,5:nchw:fp32"])
    assert "--old: expected the path of a compiled bnlab module" in capsys.readouterr().err
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    with pytest.raises(SystemExit):
        kernel_ab.main(["--old", str(other), "--new", missing, "eval:4,8,5,5:nchw:fp32"])
    assert "--new: expected the path of a compiled bnlab module" in capsys.readouterr().err
    # this checkout's own build as the old one: loading it again by path would time one module twice
    with pytest.raises(SystemExit):
        kernel_ab.main(["--old", cpu_build.library_path(), "eval:4,8,5,5:nchw:fp32"])
    assert "is this checkout's build or the one timed as new" in capsys.readouterr().err


def test_kernel_ab_times_another_module_in_place_of_this_checkouts(tmp_path, capsys):
    # Two copies of this checkout's build at other paths are two modules: both load, both run.
    old, new = tmp_path / "old.so", tmp_path / "new.so"
    data = Path(cpu_build.library_path()).read_bytes()
    old.write_bytes(data)
    new.write_bytes(data)
    kernel_ab.main(["--old", str(old), "--new", str(new), "--samples", "1", "eval:4,8,5,5:nchw:fp32:1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"old {old}", f"new {new}"]
    assert lines[2].startswith("eval:4,8,5,5:nchw:fp32:1") and "new/old" in lines[2]


def test_compare_builds_refuses_one_file_as_both_builds(tmp_path, capsys):
    # Loaded twice by path, one file is one module: the comparison would find 0 differences always.
    with pytest.raises(SystemExit):
        compare_builds.main(["--old", cpu_build.library_path()])
    assert "is the build compared as new" in capsys.readouterr().err
    copy = tmp_path / "copy.so"
    copy.write_bytes(Path(cpu_build.library_path()).read_bytes())
    with pytest.raises(SystemExit):
        compare_builds.main(["--old", str(copy), "--new", str(copy)])
    assert "is the build compared as new" in capsys.readouterr().err
