"""The non-finite guard: a batch with NaN/Inf statistics leaves the running statistics (and the count) alone."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference as ref
from bnlab.stats import Moments, update_running_stats_
from features_util import assert_close, to_np


def _moments(mean, m2, count):
    return Moments(count, torch.tensor(mean, dtype=torch.float64), torch.tensor(m2, dtype=torch.float64))


@pytest.mark.parametrize("tensor_count", [False, True])
@pytest.mark.parametrize(
    "mean, m2",
    [
        ([0.5, float("nan"), 1.0], [2.0, 2.0, 2.0]),  # one channel's mean is NaN
        ([0.5, 0.1, 1.0], [2.0, float("inf"), 2.0]),  # one channel's variance overflowed
        ([float("inf")] * 3, [float("nan")] * 3),  # everything gone
    ],
)
def test_nonfinite_batch_leaves_every_channel_unchanged(mean, m2, tensor_count):
    count = torch.tensor(8.0, dtype=torch.float64) if tensor_count else 8
    running_mean = torch.tensor([1.0, 2.0, 3.0])
    running_var = torch.tensor([4.0, 5.0, 6.0])
    accepted = update_running_stats_(running_mean, running_var, _moments(mean, m2, count), 0.1)
    assert accepted.dtype == torch.bool and accepted.dim() == 0 and not bool(accepted)
    # Per-layer decision: the finite channels are not updated either.
    assert torch.equal(running_mean, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(running_var, torch.tensor([4.0, 5.0, 6.0]))


@pytest.mark.parametrize("tensor_count", [False, True])
def test_finite_batch_matches_the_reference_update(tensor_count):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 4)) * 3 + 1
    stats = ref.moments(x)
    count = torch.tensor(stats.count, dtype=torch.float64) if tensor_count else int(stats.count)
    running_mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    running_var = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    accepted = update_running_stats_(
        running_mean, running_var, Moments(count, torch.from_numpy(stats.mean), torch.from_numpy(stats.m2)), 0.3
    )
    expected_mean, expected_var, _ = ref.update_running_stats([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], stats, 0.3)
    assert bool(accepted)
    assert_close(running_mean, expected_mean, 1e-12, "running_mean")
    assert_close(running_var, expected_var, 1e-12, "running_var")


def test_guard_off_lets_nan_through_as_torch_does():
    running_mean = torch.zeros(3)
    running_var = torch.ones(3)
    update_running_stats_(running_mean, running_var, _moments([0.0, float("nan"), 0.0], [1.0] * 3, 4), 0.1, skip_nonfinite=False)
    assert torch.isnan(running_mean[1]) and not torch.isnan(running_mean[0])


def _nan_batch(shape, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype)
    x[0, 1] = float("nan")
    return x


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_skips_a_nan_batch_and_does_not_count_it(momentum):
    torch.manual_seed(0)
    layer = bnlab.BatchNorm2d(3, momentum=momentum)
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(3)]
    layer(batches[0])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(_nan_batch((4, 3, 5, 5)))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed on a NaN batch"
    # The cumulative average (momentum=None) continues as if the NaN batch never happened.
    for x in batches[1:]:
        layer(x)
    mean, var, tracked = np.zeros(3), np.ones(3), 0
    for x in batches:
        mean, var, tracked = ref.update_running_stats(mean, var, ref.moments(to_np(x)), momentum, tracked)
    assert int(layer.num_batches_tracked) == tracked == 3
    assert_close(layer.running_mean, mean, 2e-6, "running_mean")
    assert_close(layer.running_var, var, 2e-6, "running_var")


def test_fp16_overflow_batch_is_skipped():
    layer = bnlab.BatchNorm1d(4)
    x = torch.full((8, 4), 6e4, dtype=torch.float16)
    x[0] = float("inf")  # an fp16 overflow upstream
    layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    assert int(layer.num_batches_tracked) == 0


def test_guard_switched_off_reproduces_torch_nn():
    x = _nan_batch((5, 3))
    ours, theirs = bnlab.BatchNorm1d(3, skip_nonfinite=False), torch.nn.BatchNorm1d(3)
    ours(x)
    theirs(x)
    assert_close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1


def _infinite_channels(shape, dtype, layout):
    """Channels 0-4 of a (N, 5, *) batch: +inf as the first value (the shift of the kernels' shifted
    sums), -inf further in, both infinities, a NaN, and finite values only."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    first, later = (0,) * (len(shape) - 2), tuple(s - 1 for s in shape[2:])
    x[(0, 0) + first] = float("inf")
    x[(shape[0] - 1, 1) + later] = float("-inf")
    x[(0, 2) + first], x[(shape[0] - 1, 2) + later] = float("inf"), float("-inf")
    x[(shape[0] // 2, 3) + first] = float("nan")
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@contextlib.contextmanager
def _backend(name):
    """Pin bnlab to ``name``: "cpu", "portable", or the Triton kernels run by Triton's interpreter
    on CPU tensors ("triton": the general kernels; "triton-small": the one-program ones where a
    shape qualifies). The interpreter comes from TRITON_INTERPRET=1, which tests/conftest.py sets."""
    if not name.startswith("triton"):
        bnlab.set_backend(name)
        try:
            yield
        finally:
            bnlab.set_backend(None)
        return
    pytest.importorskip("triton")
    from bnlab.backends import _REGISTRY, PortableBackend
    from bnlab.backends import triton_ops
    from bnlab.backends.triton_backend import TritonBackend

    saved, small = list(_REGISTRY), triton_ops.SMALL_NUMEL
    _REGISTRY[:] = [TritonBackend(allow_cpu=True, self_check=False), PortableBackend()]
    triton_ops.SMALL_NUMEL = small if name == "triton-small" else 0
    try:
        yield
    finally:
        _REGISTRY[:] = saved
        triton_ops.SMALL_NUMEL = small


# Triton's interpreter computes inf - inf with NumPy, which warns; the NaN is the point here
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["cpu", "portable", "triton", "triton-small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, layout",
    [((64, 5), "contiguous"), ((4, 5, 3000), "contiguous"), ((6, 5, 7, 7), "contiguous"), ((6, 5, 7, 7), "channels_last")],
)
def test_guard_off_gives_infinite_means_as_torch_nn(backend, dtype, shape, layout):
    # A channel holding one kind of infinity has the mean ±inf (torch.nn's CPU kernel and the float64
    # reference), also where that infinity is the channel's first value, which the shifted sums of
    # the kernels take as their shift (inf - inf = NaN: the mean came out NaN before), and where a
    # finite part merges after an infinite one (Chan's delta inf - inf, the one-program Triton kernels).
    x = _infinite_channels(shape, dtype, layout)
    layer_type = bnlab.BatchNorm1d if len(shape) < 4 else bnlab.BatchNorm2d
    theirs = (torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d)(5)
    theirs(x.float())  # float32 statistics of the same values (torch.nn's mixed-precision rule)
    expected_mean = ref.moments(to_np(x.double())).mean
    with _backend(backend):
        ours = layer_type(5, skip_nonfinite=False)
        ours(x)
    got = ours.running_mean
    torch.testing.assert_close(got[:4], theirs.running_mean[:4], rtol=0, atol=0, equal_nan=True)
    np.testing.assert_array_equal(to_np(got[:4]), 0.1 * expected_mean[:4])
    assert torch.isnan(ours.running_var[:4]).all()
    assert_close(got[4:], theirs.running_mean[4:], 1e-5, "the finite channel's running_mean")


@contextlib.contextmanager
def _no_host_reads():
    """Make every way of reading a tensor's value on the host raise, as a device sync would need;
    also building a tensor from Python data (a host-to-device copy on CUDA, which synchronises)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value (a device synchronisation on GPU)")

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def guarded(name):
        def factory(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                raise AssertionError(f"torch.{name} of Python data (a host-to-device copy on GPU)")
            return factories[name](data, *args, **kwargs)

        return factory

    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        for name in factories:
            setattr(torch, name, guarded(name))
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.Tensor, name, value)
        for name, value in factories.items():
            setattr(torch, name, value)


# float64 data: on CPU the portable backend's float32 sums check for overflow on the host (its
# CPU-only fallback); with float64 it takes the accumulation path it takes on CUDA.
STEP_LAYERS = {
    "plain": dict(),
    "ghost with a ragged last ghost batch": dict(virtual_batch_size=3),
    "renorm with a ramp": dict(renorm=True, renorm_ramp=(1, 10)),
    "ghost + renorm": dict(virtual_batch_size=3, renorm=True),
    "accumulation": dict(accumulation_steps=2),
}


@pytest.mark.parametrize("options", list(STEP_LAYERS.values()), ids=list(STEP_LAYERS))
def test_training_steps_never_read_values_on_the_host(options):
    layer = bnlab.BatchNorm2d(3, dtype=torch.float64, **options)  # momentum=0.1: no host value needed
    layer(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    expected = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _nan_batch((4, 3, 5, 5), torch.float64)
    mask = torch.rand(4, 5, 5) > 0.3
    good = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with _no_host_reads():
        layer(x)
        if not options:
            layer(x, mask=mask)
        layer(good).sum().backward()
        layer(good)  # the accumulation layer updates here
    assert int(layer.num_batches_tracked) > int(expected["num_batches_tracked"]), "no good step was counted"
    for key in ("running_mean", "running_var"):
        assert torch.isfinite(getattr(layer, key)).all(), key


def test_the_host_read_patch_is_effective():
    with pytest.raises(AssertionError, match="host read"), _no_host_reads():
        bool(torch.ones(()))
    with pytest.raises(AssertionError, match="host-to-device"), _no_host_reads():
        torch.tensor(1.0)


# Triton's interpreter computes inf - inf with NumPy, which warns; the NaN is the point here
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend,compiled", [("cpu", False), ("portable", False), ("triton", False),
                                              ("triton-small", False), ("cpu", True)])
def test_functional_batch_norm_skips_a_nonfinite_batch_on_every_path(backend, compiled):
    # docs/features.md: functional.batch_norm guards its running statistics as the layers do. The
    # CPU and Triton backends' fused calls were made without the guard, so a batch holding an
    # infinity entered the averages there, and not on the portable backend or under torch.compile.
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[0, 1, 0, 0] = float("inf")
    fn = bnlab.functional.batch_norm
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with _backend(backend):
        fn(bad, rm, rv, training=True)
        torch.testing.assert_close(rm, torch.zeros(3), rtol=0, atol=0)
        torch.testing.assert_close(rv, torch.ones(3), rtol=0, atol=0)
        fn(x, rm, rv, training=True)  # a finite batch still moves them
    expected = ref.moments(to_np(x.double()))
    assert_close(rm, 0.1 * expected.mean, 1e-6, "running_mean after a finite batch")
    assert_close(rv, 0.9 + 0.1 * expected.m2 / (expected.count - 1), 1e-6, "running_var after a finite batch")
