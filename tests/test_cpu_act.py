"""bnlab.BatchNormAct2d on the CPU kernels (bnlab.fused, backends/cpu_act.py, cpu_kernels_relu.inc).

The ReLU kernels work on raw bits; they are held to torch's own ops over every 16-bit pattern and
over random and special 32/64-bit ones (NaN payloads of 16-bit types aside, which torch rewrites).
The layer is held to the bits of bnlab.BatchNorm2d followed by torch's add and ReLU: the same BN
kernels, then the same add, ReLU and ReLU backward, in one pass each.
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab.backends.cpu_arguments import _CODE
from speed_helpers import make_input

CPU = bnlab.backends.get_backend("cpu")
pytestmark = pytest.mark.skipif(CPU._lib is None, reason="no compiled CPU kernels")

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45, -1e-45, 5e-324, -5e-324,
            1.0, -1.0]


def _values(dtype, seed=0):
    """Every bit pattern of a 16-bit dtype; random patterns and special values of a wider one."""
    ints = BITS[dtype]
    if ints == torch.int16:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    info = torch.iinfo(ints)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(info.min, info.max, (1 << 16,), dtype=ints, generator=gen)
    return torch.cat([bits.view(dtype), torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)])


def _same_bits(ours, theirs, dtype):
    """Equal bits, NaNs aside, and NaN at the same places (torch rewrites 16-bit NaN payloads)."""
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(BITS[dtype]), theirs[~nan].view(BITS[dtype]))


@pytest.mark.parametrize("dtype", list(BITS))
def test_relu_kernels_give_torchs_bits(dtype):
    v = _values(dtype)
    y = v.clone()
    assert CPU._lib.bn_relu(y.data_ptr(), _CODE[dtype], y.numel(), 2) == 0
    _same_bits(y, torch.relu(v), dtype)
    assert torch.signbit(y[(v == 0) & torch.signbit(v)]).all()  # -0.0 stays, as torch.relu keeps it
    # the backward from any output, negative and NaN ones included (y <= 0: +0, whatever dy there)
    dy = _values(dtype, seed=1)[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(2))]
    dy = torch.where(torch.isnan(dy), 1.0, dy)  # (a NaN dy passes as NaN; its payload is torch's to rewrite)
    dz = torch.empty_like(dy)
    assert CPU._lib.bn_relu_backward(dy.data_ptr(), v.data_ptr(), dz.data_ptr(), _CODE[dtype], dz.numel(), 2) == 0
    theirs = torch.ops.aten.threshold_backward(dy, v, 0)
    _same_bits(dz, theirs, dtype)
    assert not torch.signbit(dz[v <= 0]).any()


@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("dtype", list(BITS))
def test_add_relu_kernel_gives_torchs_add_then_relu(dtype, relu):
    gen = torch.Generator().manual_seed(3)
    n = 1 << 16
    a, b = ((torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp(20 * torch.randn(n, generator=gen,
            dtype=torch.float64))).to(dtype) for _ in range(2))  # fmt: skip
    b[:500] = -a[:500]  # exact cancellations (+0) and near ones (tiny values, -0.0 after rounding)
    b[500:1000] = (-a[500:1000].double() * (1 + 1e-9)).to(dtype)
    y = a.clone()
    assert CPU._lib.bn_add_relu(y.data_ptr(), b.data_ptr(), _CODE[dtype], n, relu, 1) == 0
    _same_bits(y, torch.relu(a + b) if relu else a + b, dtype)


def _sequence_pair(channels, residual, dtype):
    ours = bnlab.BatchNormAct2d(channels, residual=residual)
    plain = bnlab.BatchNorm2d(channels)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(ours.state_dict())
    if dtype == torch.float64:
        ours.double(), plain.double()
    return ours, plain


def _assert_kernels_route(y, training):
    """y came from the kernels' add+ReLU node, after bnlab.BatchNorm2d's compiled call."""
    assert type(y.grad_fn).__name__ == "AddReluFunctionBackward"
    bn_node = y.grad_fn.next_functions[0][0]
    assert type(bn_node).__name__ == ("CpuTrainFromKernelBackward" if training else "CpuEvalFromKernelBackward")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", list(BITS))
def test_layer_has_the_bits_of_bnlab_bn_then_torch_add_and_relu(dtype, layout, residual):
    ours, plain = _sequence_pair(6, residual, dtype)
    shape = (8, 6, 64, 48)  # 147,456 values: the kernels' route (cpu_act.KERNEL_MIN_NUMEL)
    for step, training in enumerate([True, True, False]):
        ours.train(training), plain.train(training)
        x = make_input(shape, layout, dtype, seed=step, mean=0.2 * step)
        res = make_input(shape, layout, dtype, seed=10 + step) if residual else None
        dy = make_input(shape, layout, dtype, seed=20 + step)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        r1 = res.clone().requires_grad_() if residual else None
        r2 = res.clone().requires_grad_() if residual else None
        y1 = ours(x1, r1) if residual else ours(x1)
        z2 = plain(x2) + r2 if residual else plain(x2)
        y2 = torch.relu(z2)
        _assert_kernels_route(y1, training)
        assert torch.equal(y1, y2) and y1.stride() == x.stride()
        y1.backward(dy), y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
        if residual:
            assert torch.equal(r1.grad, r2.grad)
        for name in ("weight", "bias"):
            assert torch.equal(getattr(ours, name).grad, getattr(plain, name).grad)
            getattr(ours, name).grad = getattr(plain, name).grad = None
        assert torch.equal(ours.running_mean, plain.running_mean) and torch.equal(ours.running_var, plain.running_var)
        assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked)
    with torch.no_grad():  # eval without a graph: act_eval
        x, res = make_input(shape, layout, dtype, seed=30), make_input(shape, layout, dtype, seed=31)
        ours_y = ours(x, res) if residual else ours(x)
        assert torch.equal(ours_y, torch.relu(plain(x) + res) if residual else torch.relu(plain(x)))


def test_output_changed_in_place_is_refused_as_after_torchs_relu():
    # The backward reads ReLU's mask from the saved output, as torch's ReLU does: changing the
    # output in place before the backward is the same error there and here.
    for shape in ((4, 3, 5, 5), (8, 3, 128, 64)):  # torch's ops, and the kernels' node
        x = torch.randn(shape, requires_grad=True)
        for make in (lambda: bnlab.BatchNormAct2d(3)(x), lambda: torch.relu(torch.nn.BatchNorm2d(3)(x))):
            y = make()
            y.add_(1.0)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()


def test_a_residual_in_another_layout_is_added_by_torch():
    ours, plain = _sequence_pair(5, True, torch.float32)
    x = make_input((32, 5, 32, 32), "cl", seed=1)  # 163,840 values: the kernels' route
    res = make_input((32, 5, 32, 32), "nchw", seed=2)  # other strides than x's output
    assert torch.equal(ours(x, res), torch.relu(plain(x) + res))


@pytest.mark.parametrize("options", [{"affine": False}, {"momentum": None}, {"track_running_stats": False},
                                     {"bias": False}])
def test_the_layer_s_options_keep_the_bits_of_the_sequence(options):
    ours, plain = bnlab.BatchNormAct2d(4, residual=True, **options), bnlab.BatchNorm2d(4, **options)
    plain.load_state_dict(ours.state_dict())
    for step in range(3):  # momentum None: the cumulative average over the three batches
        x, res, dy = (make_input((8, 4, 64, 64), seed=10 * step + k) for k in range(3))  # 131,072 values
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1, res), torch.relu(plain(x2) + res)
        _assert_kernels_route(y1, True)
        assert torch.equal(y1, y2)
        y1.backward(dy), y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
        if ours.running_mean is not None:
            assert torch.equal(ours.running_mean, plain.running_mean)
            assert torch.equal(ours.running_var, plain.running_var)


@pytest.mark.parametrize("residual", [False, True])
def test_small_outputs_take_torchs_ops_with_the_same_bits(residual):
    # Below cpu_act's bounds torch's own add and ReLU nodes cost less than the kernels' Python one.
    from bnlab.backends.cpu_act import KERNEL_MIN_NUMEL as least

    ours, plain = _sequence_pair(4, residual, torch.float32)
    cases = (((4, 4, 32, 32), False), ((least // 64, 4, 4, 4), True), ((least // 64 - 1, 4, 4, 4), False))
    for shape, kernels in cases:
        x, res, dy = (make_input(shape, seed=k) for k in range(3))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = ours(x1, res) if residual else ours(x1)
        y2 = torch.relu(plain(x2) + res) if residual else torch.relu(plain(x2))
        if kernels:
            _assert_kernels_route(y1, True)
        else:
            assert type(y1.grad_fn).__name__.startswith("Relu")  # torch's node
        assert torch.equal(y1, y2)
        y1.backward(dy), y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
