"""benchmarks/gpu_kernel_times.py and gpu_graphs.py refuse what they cannot run, naming the option
(they time GPU kernels; the tests have no GPU, so what is checked here is that bad input never
reaches the GPU part)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_graphs  # noqa: E402
import gpu_kernel_times  # noqa: E402


@pytest.mark.parametrize("argv,expected", [
    (["--shapes", "gpu-999"], "--shapes: expected names from"),
    (["--dtypes", "fp8"], "--dtypes: expected names from"),
    (["--layouts", "nhwc"], "--layouts: expected names from"),
    (["--modes", "backward"], "--modes: expected names from"),
    (["--contenders", "cudnn"], "--contenders: expected names from"),
    (["--calls", "0"], "--calls: expected a positive number of calls, got 0"),
])  # fmt: skip
def test_bad_options_are_refused_naming_the_option_and_value(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_kernel_times.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and expected in err
    assert argv[1].split(",")[0] in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_one_is_needed(capsys):
    with pytest.raises(SystemExit) as info:
        gpu_kernel_times.main(["--shapes", "conv-56"])
    assert info.value.code == 2 and "a CUDA device is needed" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["--shapes", "gpu-999"], "--shapes: expected names from"),
    (["--dtypes", "fp8"], "--dtypes: expected names from"),
    (["--layouts", "nhwc"], "--layouts: expected names from"),
    (["--steps", "0"], "--steps: expected a positive number of steps, got 0"),
])  # fmt: skip
def test_gpu_graphs_refuses_bad_options_naming_them(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_graphs.main(argv)
    assert info.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_graphs_without_a_gpu_says_one_is_needed(capsys):
    with pytest.raises(SystemExit) as info:
        gpu_graphs.main([])
    assert info.value.code == 2 and "a CUDA device is needed" in capsys.readouterr().err
