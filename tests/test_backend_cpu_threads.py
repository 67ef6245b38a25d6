"""How many threads a CPU call runs on (cpu.threads_for, and the compiled training call's
training_work in cpu_kernels_py_train.inc): inputs below PARALLEL_MIN_NUMEL run on one thread,
except training calls of the narrow NLC walks (a wide layer at a small batch), whose channels
count NARROW_CHANNEL_VALUES values each. The thread count changes no bit of the results; it is
the backward's plan that shows the compiled call's choice, and it must be the Python path's.
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab.backends.cpu import NARROW_CHANNEL_VALUES, NARROW_ROWS, PARALLEL_MIN_NUMEL, layout_of, threads_for

pytestmark = pytest.mark.skipif(bnlab.backends.get_backend("cpu")._lib is None, reason="no compiled CPU kernels")

# (shape, memory format): threads in a training call with torch on 2 threads
CASES = [
    ((2, 8192), None, 2),  # 16,384 values + 8 x 8,192 for the channels
    ((8, 2048), None, 2),  # exactly PARALLEL_MIN_NUMEL with its channels
    ((2, 4096), None, 2),
    ((4, 2048), None, 1),  # 8,192 + 16,384: one thread
    ((16, 1024), None, 1),
    ((256, 100), None, 1),  # more rows than the narrow walks take
    ((2, 4096, 1, 1), torch.channels_last, 2),  # NLC rows of a 4-d input: N x H x W = 2
    ((1, 4096, 2, 2), torch.channels_last, 2),  # 4 rows
    ((1, 1024, 4, 4), torch.channels_last, 1),  # 16 rows, 16,384 + 8,192
    ((2, 4096, 2), None, 1),  # NCL (L = 2): not the narrow walks
]


def _input(shape, memory_format):
    x = torch.randn(shape)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


@pytest.mark.parametrize("shape,memory_format,threads", CASES)
def test_training_calls_of_the_narrow_walks_count_their_channels(shape, memory_format, threads, keep_threads):
    torch.set_num_threads(2)
    x = _input(shape, memory_format)
    layout = layout_of(x)
    narrow = layout[0] == 1 and layout[1] <= NARROW_ROWS
    work = x.numel() + (NARROW_CHANNEL_VALUES * shape[1] if narrow else 0)
    if x.numel() >= PARALLEL_MIN_NUMEL:
        threads = 2
    assert threads == (2 if work >= PARALLEL_MIN_NUMEL else 1)  # the table above agrees with the rule
    assert threads_for(x, layout) == threads
    assert threads_for(x) == (2 if x.numel() >= PARALLEL_MIN_NUMEL else 1)  # eval and the others: values only


@pytest.mark.parametrize("shape,memory_format,threads", CASES)
def test_the_compiled_training_call_plans_the_python_path_s_threads(shape, memory_format, threads, keep_threads):
    """The plan the backward runs on (ctx.config[3], its last entry the thread count) is the same
    from the compiled layer call (training_work, in C) and from the Python path (threads_for)."""
    torch.set_num_threads(2)
    x = _input(shape, memory_format).requires_grad_()
    layer = bnlab.BatchNorm2d(shape[1]) if x.dim() == 4 else bnlab.BatchNorm1d(shape[1])
    backend = bnlab.backends.get_backend("cpu")
    if backend.train_entry() is None:
        pytest.skip("the compiled training call is not set up here")
    compiled = layer(x).grad_fn.config[3]
    with bnlab._fastpath.python_path_only():
        python = layer(x).grad_fn.config[3]
    assert compiled == python and compiled[-1] == threads_for(x.detach(), layout_of(x.detach()))


def test_a_narrow_input_gives_the_same_bits_on_one_thread_and_two(keep_threads):
    """(2, 8192) now trains on torch's threads: the narrow walks' results do not depend on it."""
    x = torch.randn(2, 8192, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(2, 8192)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layer = bnlab.BatchNorm1d(8192)
        y = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, layer.weight, layer.bias], dy), layer.running_var.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("shape", [(4, 4096), (2, 8192), (4, 2048, 4, 4)])
@pytest.mark.parametrize("data", ["normal", "nan", "inf"])
@pytest.mark.parametrize("guard,momentum", [(True, 0.1), (False, 0.1), (True, None)])
def test_the_shared_finish_of_a_wide_forward_keeps_the_serial_bits(shape, data, guard, momentum, keep_threads):
    """From 2048 channels a forward on several threads shares what follows its walk (the plain means
    of channels with an infinity, the guard's verdict, the batch count, the running averages;
    finish_forward_shares): outputs, statistics, running averages and counter must be those of one
    thread, which does it on that thread alone; a NaN or an infinity (its channel's variance is not
    finite) makes the guard skip the batch on both; with finite data the running averages are
    torch.nn's (the same code on both thread counts, so torch.nn is the outside check)."""
    x = torch.randn(shape)
    if data != "normal":
        x.view(-1)[x.numel() // 2 + 3] = float("nan") if data == "nan" else float("inf")
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layer = bnlab.BatchNorm2d(shape[1], momentum=momentum, skip_nonfinite=guard) if x.dim() == 4 else \
            bnlab.BatchNorm1d(shape[1], momentum=momentum, skip_nonfinite=guard)
        for _ in range(2):  # the second batch's cumulative factor comes from the counter
            y = layer(x)
        state = [t.clone() for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
        results.append((y, *state))
        assert threads_for(x, layout_of(x)) == threads  # the call ran on as many threads as asked
    same = [torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(*results)]
    assert all(same), same
    skipped = guard and data != "normal"
    assert int(results[1][3]) == (0 if skipped else 2)
    if data == "normal":
        torch.set_num_threads(1)
        theirs = (torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d)(shape[1], momentum=momentum)
        for _ in range(2):
            theirs(x)
        for ours, want in zip(results[1][1:3], (theirs.running_mean, theirs.running_var)):
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_the_compiled_call_refuses_a_narrow_bound_other_than_the_kernels():
    """cpu.NARROW_ROWS is the narrow walks' own bound (kRunRows in the kernels); a setup with any
    other is refused, naming it, and leaves the call as it was."""
    from bnlab.backends import cpu, cpu_entries

    backend = bnlab.backends.get_backend("cpu")
    if backend.train_entry() is None:
        pytest.skip("the compiled training call is not set up here")
    with pytest.raises(ValueError, match=r"narrow_rows: expected 16 \(kRunRows"):
        cpu_entries.setup_whole_calls(backend._lib, backend, cpu._CODE, PARALLEL_MIN_NUMEL, cpu.WAVE_PER_THREAD,
                                      (NARROW_ROWS + 1, NARROW_CHANNEL_VALUES))
    x = torch.randn(2, 8192, requires_grad=True)
    assert bnlab.BatchNorm1d(8192)(x).grad_fn.config[3][-1] == threads_for(x.detach(), layout_of(x.detach()))
