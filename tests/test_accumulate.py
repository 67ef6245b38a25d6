"""accumulation_steps=k: k micro-batches update the running statistics once, as the one big batch would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from features_util import assert_close, to_np


@pytest.mark.parametrize("momentum", [0.1, None])
def test_k_micro_batches_give_the_running_statistics_of_the_big_batch(momentum):
    torch.manual_seed(0)
    steps = [[torch.randn(n, 3, 4, 4) * 2 + 1 for n in (3, 5, 2)] for _ in range(2)]  # uneven micro-batches
    ours = bnlab.BatchNorm2d(3, momentum=momentum, accumulation_steps=3)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    for micro_batches in steps:
        for x in micro_batches:
            ours(x)
        theirs(torch.cat(micro_batches))
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 2e-6, key)
    assert int(ours.num_batches_tracked) == 2  # optimizer steps, not micro-batches
    mean, var, tracked = np.zeros(3), np.ones(3), 0
    for micro_batches in steps:
        big = np.concatenate([to_np(x) for x in micro_batches])
        mean, var, tracked = ref.update_running_stats(mean, var, ref.moments(big), momentum, tracked)
    assert_close(ours.running_mean, mean, 2e-6, "running_mean vs reference")
    assert_close(ours.running_var, var, 2e-6, "running_var vs reference")


def test_outputs_and_gradients_are_each_micro_batchs_own():
    ours, theirs = bnlab.BatchNorm1d(3, accumulation_steps=4), torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ours(x1).backward(dy)
    theirs(x2).backward(dy)
    assert_close(x1.grad, x2.grad, 2e-4, "dx")
    assert torch.equal(ours.running_mean, torch.zeros(3)), "updated before the step was complete"


def test_a_partial_group_is_applied_by_flush():
    micro = [torch.randn(4, 3) * 3 for _ in range(2)]
    layer = bnlab.BatchNorm1d(3, accumulation_steps=3)
    for x in micro:
        layer(x)
    assert int(layer.num_batches_tracked) == 0
    assert layer.flush_accumulated_stats() is True
    assert layer.flush_accumulated_stats() is False  # nothing left
    mean, var, _ = ref.update_running_stats(np.zeros(3), np.ones(3), ref.moments(np.concatenate([to_np(x) for x in micro])), 0.1)
    assert_close(layer.running_mean, mean, 2e-6, "running_mean")
    assert_close(layer.running_var, var, 2e-6, "running_var")
    assert int(layer.num_batches_tracked) == 1


def test_a_nan_micro_batch_skips_the_whole_step():
    layer = bnlab.BatchNorm1d(3, accumulation_steps=2)
    layer(torch.randn(4, 3))
    bad = torch.randn(4, 3)
    bad[0, 0] = float("inf")
    layer(bad)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0


def test_pending_statistics_are_not_state():
    layer = bnlab.BatchNorm2d(3, accumulation_steps=2)
    layer(torch.randn(2, 3, 4, 4))
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict())
    assert [name for name, _ in layer.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]


@pytest.mark.parametrize("how", ["reset_running_stats", "load_state_dict"])
def test_pending_micro_batches_go_with_the_statistics_they_belong_to(how):
    # A reset or a loaded checkpoint starts the running statistics afresh: micro-batches collected
    # before it (here far from zero) must not be merged into the first group after it.
    layer = bnlab.BatchNorm2d(3, accumulation_steps=2)
    layer(torch.randn(4, 3, 2, 2) + 10)
    if how == "reset_running_stats":
        layer.reset_running_stats()
    else:
        layer.load_state_dict(bnlab.BatchNorm2d(3).state_dict())
    gen = torch.Generator().manual_seed(4)
    micro = [torch.randn(4, 3, 2, 2, generator=gen) for _ in range(2)]
    for x in micro:
        layer(x)
    mean, var, _ = ref.update_running_stats(np.zeros(3), np.ones(3), ref.moments(np.concatenate([to_np(x) for x in micro])), 0.1)
    assert_close(layer.running_mean, mean, 2e-6, "running_mean")
    assert_close(layer.running_var, var, 2e-6, "running_var")
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, None, True])
def test_bad_accumulation_steps_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="accumulation_steps"):
        bnlab.BatchNorm1d(3, accumulation_steps=bad)


@pytest.mark.parametrize("options", [{"accumulation_steps": 2}, {"virtual_batch_size": 3}])
def test_an_infinite_part_merges_to_the_whole_batchs_infinite_mean(options):
    # With the guard off, a channel holding +inf and no NaN has the mean +inf (torch.nn, the
    # reference); merging a part with an infinite mean gave inf - inf = NaN.
    x = torch.tensor([[1.0], [float("inf")], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]])
    layer = bnlab.BatchNorm1d(1, skip_nonfinite=False, **options)
    for part in (x[:2], x[2:4]) if "accumulation_steps" in options else (x,):
        layer(part)
    theirs = torch.nn.BatchNorm1d(1)
    theirs(x[:4] if "accumulation_steps" in options else x)
    assert torch.equal(layer.running_mean, theirs.running_mean) and layer.running_mean.item() == float("inf")


def test_compiled_micro_batches_keep_no_graph_across_steps():
    # Under torch.compile the pending statistics came out attached to the step's graph: with three
    # micro-batches the second one's backward ran into the first one's freed graph (a RuntimeError).
    ours, eager = bnlab.BatchNorm2d(4, accumulation_steps=3), bnlab.BatchNorm2d(4, accumulation_steps=3)
    compiled = torch.compile(ours, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    for _ in range(6):
        x = torch.randn(8, 4, 5, 5, generator=gen)
        compiled(x.clone().requires_grad_()).sum().backward()
        eager(x.clone().requires_grad_()).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), eager.state_dict().values()))
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("strict", [False, True])
def test_export_of_a_training_layer_that_accumulates_is_refused_and_changes_nothing(strict):
    # Tracing had left fake tensors in the eager layer's accumulator (which then stayed a micro-batch
    # out of step), and the exported program never updated the running statistics.
    layer = bnlab.BatchNorm2d(3, accumulation_steps=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(Exception, match="keeps its pending micro-batches in Python between training calls") as err:
        torch.export.export(layer, (torch.randn(4, 3, 3, 3),), strict=strict)
    assert "export the model in eval mode" in str(err.value)
    assert layer._stats_accumulator.pending is None
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    program = torch.export.export(layer.eval(), (torch.randn(4, 3, 3, 3),), strict=strict).module()
    x = torch.randn(4, 3, 3, 3)
    assert torch.equal(program(x), layer(x))
