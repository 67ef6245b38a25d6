"""benchmarks/profile_model_step.py: it sorts the profiler's rows as its table says, and runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_model_step  # noqa: E402


def test_rows_fall_into_the_parts_of_a_step():
    assert profile_model_step.category("aten::convolution_backward") == "conv bwd"
    assert profile_model_step.category("aten::mkldnn_convolution") == "conv fwd"
    assert profile_model_step.category("bnlab::batch_norm_train_backward") == "bnlab ops"
    assert profile_model_step.category("graph_0_cpp_fused_add_relu_2") == "inductor kernels"
    assert profile_model_step.category("aten::add_") == "rest"


def test_a_malformed_variant_is_refused_by_name():
    assert profile_model_step.parse_variants("bnlab:c,torch.nn:e") == [("bnlab", True), ("torch.nn", False)]
    with pytest.raises(argparse.ArgumentTypeError, match=r"--variants: expected .* got 'bnlab:x'"):
        profile_model_step.parse_variants("bnlab:x")


def test_it_runs_and_accounts_for_the_step(capsys):
    import torch._inductor.config as inductor_config

    threads, kernel_profile = torch.get_num_threads(), inductor_config.cpp.enable_kernel_profile
    try:
        profile_model_step.main(["--variants", "bnlab:e,torch.nn:e", "--rounds", "1", "--batch", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
        inductor_config.cpp.enable_kernel_profile = kernel_profile
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# profile_model_step.py --batch 2") and lines[1].split()[-1] == "wall"
    for line, label in zip(lines[2:], ("bnlab eager", "torch.nn eager")):
        assert line.startswith(label)
        conv_fwd, conv_bwd, bn_ops, inductor, rest, wall = map(float, line.split()[2:])
        assert conv_fwd > 0 and conv_bwd > 0 and bn_ops == 0 and inductor == 0  # eager: no compiled code
        assert conv_fwd + conv_bwd + rest <= wall * 1.5  # self times of one step (profiler overhead aside)
