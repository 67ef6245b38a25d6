"""Shared helpers of the fast-path tests (CPU kernels, Triton kernels, fused layers, folding).

Comparison is relative to the scale of the expected values, NaN-aware, in float64, as the
core tests do; tolerances follow DEVELOPERS.md (2e-4 for float32, 1e-9 for float64).
"""

from __future__ import annotations

import numpy as np
import torch

import bnlab

TOL = {getattr(torch, name): tol for name, tol in bnlab.reference.TOLERANCE.items()}


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|); inf if NaNs sit in different places."""
    a = torch.as_tensor(actual.detach() if isinstance(actual, torch.Tensor) else np.asarray(actual)).double().cpu()
    e = torch.as_tensor(expected.detach() if isinstance(expected, torch.Tensor) else np.asarray(expected)).double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    if bool((torch.isnan(a) != torch.isnan(e)).any()):
        return float("inf")
    diff = torch.where(torch.isnan(e), torch.zeros_like(a), (a - e).abs())
    return float(diff.max()) / max(1.0, float(torch.nan_to_num(e, nan=0.0).abs().max()))


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} exceeds {tol:.1g}"


def assert_same_values(actual, expected, what: str = "") -> None:
    """The same values to the bit, NaN where the other has NaN (any NaN payload)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def seeded_layer(cls, channels: int = 3, training: bool = False, var=(0.5, 2.0)):
    """A bnlab layer of ``channels`` with seeded non-trivial state: weight in [0.5, 1.5], bias and
    running_mean in [-1, 1], running_var in ``var``; in training or eval mode."""
    torch.manual_seed(0)
    layer = cls(channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(*var)
    return layer.train(training)


def make_input(shape, layout="nchw", dtype=torch.float32, seed=0, mean=0.0, std=1.0) -> torch.Tensor:
    """Random input of the given memory layout: nchw (contiguous), cl (channels-last), cf (channels first), strided."""
    gen = torch.Generator().manual_seed(seed)
    x = (mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return to_layout(x, layout)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    if layout == "cl":  # channels innermost, for any rank (a transposed (N, *, C) tensor)
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "cf":  # channels outermost in memory (a transposed (C, N, *) tensor, e.g. h.t())
        return x.movedim(1, 0).contiguous().movedim(0, 1)
    if layout == "strided":  # neither layout: every other element of a wider tensor
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


#: The results of step_and_eval, in order.
STEP_AND_EVAL = ("y", "dx", "dweight", "dbias", "running_mean", "running_var", "eval")


def step_and_eval(layer, x: torch.Tensor, dy: torch.Tensor) -> tuple:
    """(y, dx, dweight, dbias, running mean, running variance, eval output) of a training step of
    ``layer`` (an affine BN layer in training mode) on a leaf copy of x with upstream gradient dy,
    then an eval call on x under no_grad; the layer is left in eval mode."""
    leaf = x.detach().requires_grad_()
    y = layer(leaf)
    grads = torch.autograd.grad(y, [leaf, layer.weight, layer.bias], dy)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    return (y, *grads, layer.running_mean.clone(), layer.running_var.clone(), y_eval)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def assert_backend_matches_reference(backend, shape, layout: str, dtype: torch.dtype) -> None:
    """A backend's forward_train and backward against the float64 reference (bnlab.reference): y and
    dx within the dtype's tolerance, the statistics within 1e-9, the parameter gradients per value
    within 1e-6; outputs in x's strides."""
    from bnlab import reference as ref

    channels = shape[1]
    x = make_input(shape, layout, dtype, seed=1, mean=0.5, std=2.0)
    dy = make_input(shape, layout, dtype, seed=2)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    y, stats, invstd = backend.forward_train(x, w, b, 1e-5)
    dx, dw, db = backend.backward(dy, x, stats.mean, invstd, w, stats.count, True)
    expected_y, cache = ref.forward_train(np64(x), np64(w), np64(b))
    expected_dx, expected_dw, expected_db = ref.backward(np64(dy), cache)
    assert y.dtype == dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert_close(y, expected_y, TOL[dtype], "y")
    assert_close(dx, expected_dx, TOL[dtype], "dx")
    assert_close(stats.mean, cache.mean, 1e-9, "mean")
    assert_close(stats.m2 / stats.count, cache.var, 1e-9, "variance")
    n = stats.count
    assert_close(dw / n, expected_dw / n, 1e-6, "dweight")
    assert_close(db / n, expected_db / n, 1e-6, "dbias")


def row_walk_inputs(rows: int, c: int, seed: int, dtype=torch.float32, offset: float = 0.0, infinity: bool = False):
    """(x, dy, mean, invstd, weight, bias, (Σdy, Σdy·x̂)) for the NLC row forms' tests: (rows, C) x and
    dy of dtype (at offset ± 0.01 where offset), x with a NaN (and an infinity), float64 statistics
    and sums, and a weight of 1e-39 at channel 1 (denormal outputs)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.01 if offset else 1.0
    x, dy = ((torch.randn(rows, c, generator=gen) * scale + offset).to(dtype) for _ in range(2))
    x[rows // 2, c - 1] = float("nan")
    if infinity:
        x[0, c // 2] = float("inf")
    mean = torch.randn(c, generator=gen, dtype=torch.float64) + offset
    invstd = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    weight[1], bias[1] = 1e-39, 0.0  # channel 1's outputs denormal
    sums = (torch.randn(c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64))
    return x, dy, mean, invstd, weight, bias, sums


def as_ncl(t: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (1, C, N), contiguous: the same values in layout NCL."""
    return t.t().contiguous().unsqueeze(0)


def from_ncl(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_ncl`."""
    return t.squeeze(0).t()


def bf16_special_values(shape, seed: int) -> torch.Tensor:
    """A contiguous (shape) bf16 tensor of magnitudes 1e-40 .. 1e30, subnormal bf16 values among
    them (which stores must round, not flush), and inf, -inf, NaN, ±3.38e38 and a negative NaN as
    its first six values, for the tests that bf16 stores round as torch's float32 -> bfloat16
    conversion.

    Values that underflow to zero become 1: BN's y = (x - hi)·scale + shift adds a +0 shift, which
    makes -0 into +0 (as torch.nn's BN does), where x·scale keeps the sign.
    """
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-40, 30, shape, generator=gen)).to(torch.bfloat16)
    x[x == 0] = 1.0
    assert bool(((x.abs() < 1.1754944e-38) & (x != 0)).any()), "no subnormal bf16 value in the data"
    x.view(-1)[:5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.38e38, -3.38e38]).to(torch.bfloat16)
    x.view(torch.int16).view(-1)[5] = torch.tensor(0xFFC0, dtype=torch.int32).to(torch.int16)  # -NaN
    return x


def assert_bf16_is_scaled_as_torch(y: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """y, a kernel's bf16 result of x·scale (x from bf16_special_values, x·scale exact in float32),
    holds torch's float32 -> bfloat16 rounding of it bit for bit, its two NaNs where torch's are,
    each stored as 0x7fc0 (the scalar conversion's one NaN, and bnlab's for every NaN: the integer
    rounding would carry a negative NaN's bits elsewhere)."""
    expected = (x.float() * scale).to(torch.bfloat16)
    nan = torch.isnan(expected)  # torch's vectorised conversion may give another NaN encoding
    assert torch.equal(torch.isnan(y), nan) and int(nan.sum()) == 2
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert (y[nan].view(torch.int16) == 0x7FC0).all(), y[nan].view(torch.int16)


def assert_fused_relu_handles_nan_as_torch():
    """bnlab.BatchNormAct2d with the backend now selected, on NaN inputs, against torch.nn's sequence
    BN -> (+ residual) -> ReLU: NaN stays NaN through the ReLU (training and eval), and where the
    pre-activation is NaN the gradient passes as in torch's ReLU backward (not z <= 0), so dx,
    dresidual and the parameters' gradients of the channel are torch.nn's."""
    nan = float("nan")
    x = torch.tensor([nan, 1.0]).view(2, 1, 1, 1)
    train_y = bnlab.BatchNormAct2d(1)(x)
    with torch.no_grad():
        eval_y = bnlab.BatchNormAct2d(1).eval()(x)
    assert torch.isnan(train_y).all(), train_y  # the batch's statistics are NaN
    assert torch.isnan(eval_y[0]).all() and abs(float(eval_y[1]) - 1.0) < 1e-4, eval_y

    def step(layer, bn):
        xg = torch.tensor([0.5, 1.0, -1.0]).view(3, 1, 1, 1).requires_grad_()
        rg = torch.tensor([nan, 0.0, 0.0]).view(3, 1, 1, 1).requires_grad_()
        y = layer(xg, rg)
        y.backward(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
        return xg.grad, rg.grad, bn.weight.grad, bn.bias.grad

    ours = bnlab.BatchNormAct2d(1, residual=True)
    theirs = torch.nn.BatchNorm2d(1)
    got = step(ours, ours)
    want = step(lambda a, r: torch.relu(theirs(a) + r), theirs)
    for name, g, w in zip(("dx", "dresidual", "dweight", "dbias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def at_the_rounded_mean(seed=3, infinity_at=None):
    """(x, dy) (40, 3, 2, 2): channel 0 holds v = 1000 at 150 of its 160 positions, v + 2 ulp at 5 and
    v - ulp at 5, so that its mean v + ulp/32 rounds to v in float32 (mean_lo != 0); dy normal
    with +inf at one x = v - ulp, below the mean (Σdy = +inf, Σdy·x̂ = -inf), or at one x = v
    (the rounded mean itself: still below the mean) with ``infinity_at="mean"``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 3, 2, 2, generator=gen)
    v, ulp = 1000.0, float(np.spacing(np.float32(1000.0)))
    channel = torch.full((160,), v)
    channel[:5], channel[5:10] = v + 2 * ulp, v - ulp
    x[:, 0] = channel[torch.randperm(160, generator=gen)].view(40, 2, 2)
    dy = torch.randn(40, 3, 2, 2, generator=gen)
    target = v if infinity_at == "mean" else v - ulp
    at = (x[:, 0] == torch.tensor(target, dtype=torch.float32)).nonzero()[0]
    dy[at[0], 0, at[1], at[2]] = float("inf")
    return x, dy
