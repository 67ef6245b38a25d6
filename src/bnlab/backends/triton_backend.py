"""The Triton backend: bnlab's GPU kernels (triton_reduce, triton_elementwise) behind the backend contract.

Claims CUDA tensors of float32, float16 and bfloat16 (float32 arithmetic, float64 statistics)
when triton imports; triton is an optional extra and is imported on the first CUDA tensor only,
never by ``import bnlab``. Inputs that are neither contiguous nor channels-last (expanded, strided,
permuted views) run on a contiguous copy, their outputs laid out as ``torch.empty_like(view)``
(bnlab.backends.views), except the elementwise passes of a permuted dense view; empty inputs,
float64 and cross-process (tensor) counts are handed to the portable implementation.
``TritonBackend(allow_cpu=True)`` also claims CPU tensors: with TRITON_INTERPRET=1 that runs the
kernels in Triton's interpreter, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab._checks import check_running_var_nonnegative
from bnlab._memory import memory_readable, readable_vector
from bnlab.backends.base import Backend
from bnlab.backends.portable import PortableBackend
from bnlab.backends import views
from bnlab.backends.views import laid_out_as
from bnlab.stats import Moments

__all__ = ["TritonBackend"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PORTABLE = PortableBackend()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with x's dtype and strides: the flat kernels address both tensors by the same offsets (a
    view with torch's negative bit, whose memory holds -t, is copied resolved too)."""
    if views.addressed_like(t, x):
        return t
    return torch.empty_like(x).copy_(t)


def _checked(y: Tensor, ok: Tensor, running_var: Tensor) -> Tensor:
    """y, once the eval kernels' flag says no running variance is negative (bnlab refuses those).

    On CUDA an asynchronous device-side assertion, so that eval never waits for the GPU; elsewhere
    (the interpreter) the flag is read at once and the error names the channels. A flag kept for
    later calls (triton_ops.variance_flag; here only where a test or benchmark takes CPU tensors
    for GPU ones) is set again first, so that the next call starts from a clear state.
    """
    if y.is_cuda:
        torch._assert_async(ok, "running_var: expected non-negative values, got negative entries")
    elif not bool(ok):
        ok.fill_(1)
        check_running_var_nonnegative(running_var)  # raises, naming the channels
    return y


def _vector(v: Tensor | None) -> Tensor | None:
    """A (C,) vector as the kernels address it, by pointer and channel index: v itself when
    contiguous and without torch's negative bit (whose memory holds -v), else its resolved
    contiguous copy (a parameter sliced with a step, say); None stays None. For the compositions'
    read-only vectors: the whole calls, which write running statistics in place, decline instead
    (_all_plain)."""
    if readable_vector(v) is None or (v.is_contiguous() and not v.is_neg()):
        return v
    return v.resolve_neg().contiguous()


def _all_plain(x: Tensor, *vectors: Tensor | None) -> bool:
    """Each vector None, or contiguous on x's device (what the kernels address by pointer) without
    torch's negative bit (whose memory holds -v), of a class that leaves its operations to torch
    (bnlab._memory)."""
    device = x.device
    for v in vectors:
        if v is not None and not (v.device == device and v.is_contiguous() and not v.is_neg() and memory_readable(v)):
            return False
    return True


class TritonBackend(Backend):
    """Triton kernels for GPU tensors (see the module docstring)."""

    name = "triton"

    def __init__(self, allow_cpu: bool = False, self_check: bool | None = None) -> None:
        self.allow_cpu = allow_cpu
        # The first-use check runs on GPUs; the interpreter tests check the kernels themselves.
        self.self_check = (not allow_cpu) if self_check is None else self_check
        self._ops = None
        self._tried = False
        self.error: str | None = None
        self._device_ok: dict[torch.device, bool] = {}

    def ops(self):
        """bnlab.backends.triton_ops (imports triton), or None if triton is unavailable."""
        if not self._tried:
            try:
                from bnlab.backends import triton_ops

                self._ops = triton_ops
            except Exception as exc:  # no triton, or a triton that does not load: portable path
                self.error = f"{type(exc).__name__}: {exc}"
            self._tried = True
        return self._ops

    def supports(self, x: Tensor) -> bool:
        if not (x.is_cuda or (self.allow_cpu and x.is_cpu)) or x.dtype not in _DTYPES or not memory_readable(x):
            return False  # (a subclass handling its operations in Python, e.g. FakeTensor: bnlab._memory)
        if self.ops() is None:
            return False
        return self._device_usable(x.device)

    def _device_usable(self, device: torch.device) -> bool:
        """Whether the kernels passed their first-use check on ``device`` (bnlab.backends.triton_selfcheck)."""
        ok = self._device_ok.get(device)
        if ok is None:
            ok = True
            if self.self_check:
                from bnlab.backends import triton_selfcheck

                self._device_ok[device] = True  # the check itself runs this backend's kernels
                reason = triton_selfcheck.kernels_agree(self, _PORTABLE, device)
                if reason is not None:
                    ok = False
                    self.error = reason
                    triton_selfcheck.decline_with_warning(device, reason)
            self._device_ok[device] = ok
        return ok

    def plan(self, x: Tensor):
        """The kernels' plan for x, or None when the portable implementation must run (or, for a view
        with torch's negative bit, whose memory holds -x, the resolved copy: views.kernel_input)."""
        return self.ops().plan(x) if x.dtype in _DTYPES and not x.is_neg() else None

    def kernel_input(self, x: Tensor, elementwise: bool = False):
        """(x, its plan) if the kernels take x; for a non-empty view in other strides, its
        contiguous copy and that copy's plan; None for the portable implementation: empty x, other
        dtypes, and for an ``elementwise`` pass (normalize, the input gradient from given sums) a
        permuted contiguous view, which it takes as it is.

        Why copy: the portable path sums such views in float64 on CUDA in several torch passes,
        and float32 on other devices, where an expanded batch's constant channels let 1/sqrt(eps)
        magnify the rounding; the CPU backend copies them too (the rule of views.kernel_input).
        """
        p = self.plan(x)
        if p is not None:  # the common case first: host time is what small GPU calls cost
            return x, p
        if x.dtype not in _DTYPES:
            return None  # (no copy of a view whose copy the plan would decline too)
        return views.kernel_input(x, self.plan, elementwise)

    # -- fused compositions ----------------------------------------------------------------------
    def forward_train(self, x, weight, bias, eps):
        found = self.kernel_input(x)
        if found is None:
            return _PORTABLE.forward_train(x, weight, bias, eps)
        xk, p = found
        y, stats, _, _ = self.ops().forward_train(xk, _vector(weight), _vector(bias), eps, p=p)
        mean, m2, invstd = stats.unbind()
        return laid_out_as(y, x, xk), Moments(p.m, mean, m2), invstd

    def backward(self, dy, x, mean, invstd, weight, count, need_input_grad, batch_mean=False):
        found = self.kernel_input(x)
        if found is None or isinstance(count, Tensor) or int(count) != found[1].m:
            return _PORTABLE.backward(dy, x, mean, invstd, weight, count, need_input_grad, batch_mean)
        xk, p = found
        stats = torch.stack([mean, mean, invstd]).to(torch.float64)  # rows mean, (unused), invstd
        dx, sums, _ = self.ops().backward(_like(dy, xk), xk, stats, _vector(mean.to(torch.float32)), _vector(weight),
                                          need_input_grad, p=p, centred=batch_mean)  # fmt: skip
        return laid_out_as(dx, x, xk), sums[1], sums[0]

    # -- primitives --------------------------------------------------------------------------------
    def moments(self, x):
        found = self.kernel_input(x)
        if found is None:
            return _PORTABLE.moments(x)
        _, stats, _, _ = self.ops().forward_train(found[0], None, None, 1.0, want_y=False, p=found[1])
        return Moments(found[1].m, stats[0], stats[1])

    def grad_sums(self, dy, x, mean, invstd, batch_mean=False):
        found = self.kernel_input(x)
        if found is None:
            return _PORTABLE.grad_sums(dy, x, mean, invstd, batch_mean)
        xk, p = found
        stats = torch.stack([mean, mean, invstd]).to(torch.float64)
        _, sums, _ = self.ops().backward(_like(dy, xk), xk, stats, _vector(mean.to(torch.float32)), None, need_dx=False,
                                         p=p, centred=batch_mean)  # fmt: skip
        return sums[0], sums[1]

    def normalize(self, x, mean, invstd, weight, bias):
        found = self.kernel_input(x, elementwise=True)
        if found is None:
            return _PORTABLE.normalize(x, mean, invstd, weight, bias)
        xk, p = found
        mean, invstd = _vector(mean.to(torch.float64)), _vector(invstd.to(torch.float64))
        return laid_out_as(self.ops().normalize_with(xk, mean, invstd, _vector(weight), _vector(bias), p=p), x, xk)

    def grad_input(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        found = self.kernel_input(x, elementwise=True)
        if found is None or isinstance(count, Tensor):
            return _PORTABLE.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
        xk, p = found
        dx = self.ops().grad_input_with(_like(dy, xk), xk, mean, invstd, weight, sum_dy, sum_dy_xhat, max(count, 1), p=p)
        return laid_out_as(dx, x, xk)

    # -- whole-call hooks --------------------------------------------------------------------------
    def train_forward(self, x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked=None,
                      skip_nonfinite=False):  # fmt: skip
        p = self.plan(x)
        if p is None or not _all_plain(x, weight, bias, running_mean, running_var, num_batches_tracked):
            return None
        from bnlab.backends.triton_autograd import apply_train

        config = (eps, self, running_mean, running_var, momentum, num_batches_tracked, skip_nonfinite, p)
        return apply_train(x, weight, bias, config)

    def eval_forward(self, x, running_mean, running_var, weight, bias, eps):
        p = self.plan(x)
        if p is None or not _all_plain(x, weight, bias, running_mean, running_var):
            return None
        y, ok = self.ops().normalize_with(x, running_mean, running_var, weight, bias, eps, given_invstd=False, p=p)
        return _checked(y, ok, running_var)

    # -- fused BN (+ residual) + ReLU: used by bnlab.BatchNormAct2d ------------------------------------
    def act_forward(self, x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, residual, relu):
        """(y, saved) for y = act(BN(x) + residual) in training, or None for the generic path (bnlab.fused).

        Running averages, batch counter and non-finite guard as in :meth:`train_forward`.
        """
        p = self.plan(x)
        if p is None or not _all_plain(x, weight, bias, running_mean, running_var, counter):
            return None
        residual = None if residual is None else _like(residual, x)
        y, stats, coef, mask = self.ops().forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, counter, guard,
            residual=residual, relu=relu, want_mask=relu, p=p,
        )  # fmt: skip
        return y, (stats, coef[0], mask, p)

    def act_backward(self, dy, x, weight, saved, need_dx, need_res, dweight, dbias):
        """(dx, dresidual) of act_forward's output; writes dweight/dbias (tensors or None) in place."""
        stats, hi, mask, p = saved
        dx, _, dres = self.ops().backward(
            _like(dy, x), x, stats, hi, weight, need_dx, mask=mask, want_dres=need_res, dweight=dweight, dbias=dbias, p=p,
            centred=True,  # act_forward's own batch mean
        )
        return dx, dres

    def act_eval(self, x, running_mean, running_var, weight, bias, eps, residual, relu):
        """act(BN_eval(x) + residual) without autograd, or None for the generic path."""
        p = self.plan(x)
        if p is None or not _all_plain(x, weight, bias, running_mean, running_var):
            return None
        residual = None if residual is None else _like(residual, x)
        y, ok = self.ops().normalize_with(
            x, running_mean, running_var, weight, bias, eps, given_invstd=False, residual=residual, relu=relu, p=p
        )
        return _checked(y, ok, running_var)
