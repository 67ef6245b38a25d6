"""The fast CPU backend: bnlab's compiled kernels (cpu_kernels.cpp) behind the backend contract.

Claims CPU tensors of float32, float64, bfloat16 and float16 (statistics in float64, the
elementwise phase in float32 for the half types, as the portable backend). The kernels run on
memory that is either contiguous (N, C, *) or channels-last (channels innermost: channels_last,
channels_last_3d, or a transposed (N, L, C) tensor); an input of other strides (an expanded,
strided or permuted view) is copied into contiguous memory first, as torch.nn's CPU kernels do,
and its outputs are laid out as before (bnlab.backends.cpu_layout). Empty tensors are handed to
the portable implementation inside this backend, so that pinning it (``set_backend("cpu")``)
works for every CPU tensor. Without a compiler the backend claims nothing (see cpu_build).

Per-call Python work is kept to a few attribute reads and one kernel call: the small MLP shapes
are bound by this overhead, not by memory. ``train_forward`` therefore runs the whole training
step (statistics, normalize, running averages) in one call under a lean autograd Function
(cpu_autograd), and ``eval_forward`` normalizes straight from the running buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab._checks import check_running_var_nonnegative
from bnlab._memory import memory_readable
from bnlab.backends import cpu_build, cpu_pool
from bnlab.backends.base import Backend
from bnlab.backends.cpu_autograd import apply_train
from bnlab.backends.cpu_entries import setup_layer_call, setup_whole_calls
from bnlab.backends import cpu_arguments
from bnlab.backends.cpu_arguments import _CODE, _F64, _f64, _like, is_plain_vector, param  # noqa: F401  (re-exported)
from bnlab.backends.cpu_layout import _NLC, fits, kernel_input, laid_out_as, layout_of  # noqa: F401  (re-exported)
from bnlab.backends.portable import PortableBackend
from bnlab.stats import Moments

__all__ = ["CpuBackend"]

_PORTABLE = PortableBackend()  # for what the kernels do not take: empty tensors

#: Whether calls may take the compiled whole-call entries (eval_entry, train_entry, backward_entry);
#: off inside bnlab._fastpath.python_path_only(), for A/B comparisons with the Python path.
COMPILED_CALLS = {"on": True}

#: Below this many elements one thread is faster than waking the others.
PARALLEL_MIN_NUMEL = 1 << 15
#: But a training call that the narrow NLC walks take (at most NARROW_ROWS rows: a wide layer at a
#: small batch, (2, 8192); cpu_kernels_nlc_choices.inc, nlc_narrow_walk) is mostly per-channel float64 work (the
#: statistics, a square root and a division per channel, the running averages; the backward's
#: coefficients), so there a channel counts as NARROW_CHANNEL_VALUES values towards
#: PARALLEL_MIN_NUMEL. Layer calls with the rule against without it (benchmarks/narrow_threads_ab.py;
#: docs/benchmark_rounds.md, forty-sixth session): training steps of (2, 8192), (3, 8192), (4, 4096)
#: and (2, 4096) 0.69-0.88 of the time, (8, 2048) 0.94-1.01 (its forward 0.85-0.92); counting 16
#: values a channel, (4, 2048) and (16, 1024) steps took 1.04-1.07x as long. Eval keeps
#: PARALLEL_MIN_NUMEL: its kernel calls took 1.05-2.1x as long on two threads at every such shape.
NARROW_ROWS = 16
NARROW_CHANNEL_VALUES = 8
#: Elements per NCL wave and thread: the channels of a wave stay in the cores' L2 between the
#: reduce and the elementwise pass (measured: docs/benchmarks.md).
WAVE_PER_THREAD = 1 << 16


def threads_for(x: Tensor, training_layout: tuple[int, int, int, int] | None = None) -> int:
    """torch's intra-op thread count, or 1 for inputs too small to share.

    ``training_layout``: x's layout_of in a training call (forward or backward), where the narrow
    walks' inputs count their channels too (NARROW_CHANNEL_VALUES).
    """
    work = x.numel()
    if training_layout is not None and training_layout[0] == _NLC and training_layout[1] <= NARROW_ROWS:
        work += NARROW_CHANNEL_VALUES * training_layout[2]
    return torch.get_num_threads() if work >= PARALLEL_MIN_NUMEL else 1


class CpuBackend(Backend):
    """Compiled, cache-blocked, multi-threaded kernels for CPU tensors (see the module docstring)."""

    name = "cpu"

    def __init__(self) -> None:
        self._loaded = None
        self._eval_entry = None  # bn_eval_module once set up, False when there is none
        self._train_entry = None  # bn_train_module likewise
        self._layer_call = None  # bn_layer_call likewise
        self._backward_entry = None  # bn_backward_module once the train entry is set up, False without

    def kernels(self):
        """The loaded kernels (compiled on first use), or None when unavailable; the extension
        module's whole calls set up with them (:meth:`eval_entry`)."""
        if self._loaded is None:
            self._loaded = cpu_build.load()
            if self._loaded is not None and not cpu_arguments.compiled_vector_check():
                self.eval_entry()  # (the first to load: the Python path's vector checks want its setup)
        return self._loaded

    @property
    def _lib(self):
        return self._loaded if self._loaded is not None else self.kernels()

    def eval_entry(self):
        """The extension module's ``bn_eval_module`` (cpu_kernels_py_eval.inc), set up on first use;
        None with the ctypes build or without the kernels.

        ``bn_eval_module(layer, x)`` is a BN layer's whole inference call, or None, having changed
        nothing, for anything but the plain case (see :func:`bnlab._fastpath.module_forward`).
        """
        if self._eval_entry is None:
            entry, train = setup_whole_calls(self._lib, self, _CODE, PARALLEL_MIN_NUMEL, WAVE_PER_THREAD,
                                             (NARROW_ROWS, NARROW_CHANNEL_VALUES))
            self._eval_entry, self._train_entry = entry or False, train or False
            if entry is not None:  # (set up now: its checks read what bn_eval_setup gave it)
                cpu_arguments.use_compiled_vector_check(getattr(self._lib, "bn_plain_vector", None))
        return self._eval_entry or None

    def layer_call(self, plain_forward, backends_module, device_calls=None):
        """The extension module's ``bn_layer_call`` (cpu_kernels_py_call.inc), set up on first use
        for layers whose forward is ``plain_forward``; None where :meth:`eval_entry` is None.

        ``bn_layer_call(layer, x)`` is ``layer(x)`` in one compiled call when nn.Module.__call__
        would only hand x to the plain forward, x is a CPU tensor and this backend is the one
        ``backends_module`` (bnlab.backends) chooses for CPU tensors. Other plain calls (a GPU
        tensor, another backend chosen) it validates itself and hands to ``device_calls``,
        (_fastpath.device_eval, _fastpath.device_train), when given. Having changed nothing, it
        answers NotImplemented where the call is plain but not its to make (the caller then calls
        forward), None where nn.Module.__call__ would do more (see
        bnlab.modules._BatchNormMixin.__call__).
        """
        if self._layer_call is None:
            lib = self._lib if self.eval_entry() is not None else None
            call = setup_layer_call(lib, self, plain_forward, backends_module, COMPILED_CALLS, device_calls)
            self._layer_call = call or False
        return self._layer_call or None

    def train_entry(self):
        """The extension module's ``bn_train_module`` (cpu_kernels_py_train.inc), set up on first use;
        None where :meth:`eval_entry` is None or torch lacks the C apply it calls.

        ``bn_train_module(layer, x)`` is a BN layer's whole training-mode call (statistics, output,
        running averages, and the autograd node when a graph is wanted), or None, having changed
        nothing, for anything but the plain case (see :func:`bnlab._fastpath.module_forward`).
        """
        if self._train_entry is None:
            self.eval_entry()  # sets up both
        return self._train_entry or None

    def supports(self, x: Tensor) -> bool:
        # (a tensor subclass that handles its operations in Python, such as FakeTensor, has no
        # memory the kernels could read: it takes the portable backend's torch operators)
        return x.is_cpu and x.dtype in _CODE and self._lib is not None and memory_readable(x)

    # -- fused compositions ----------------------------------------------------------------------
    def forward_train(self, x, weight, bias, eps):
        found = kernel_input(x)
        if found is None:
            return _PORTABLE.forward_train(x, weight, bias, eps)
        xk = found[0]
        y, stats, _ = self.forward_stats(xk, weight, bias, eps, None, None, 0.0)
        mean, m2, invstd = stats.unbind()
        return laid_out_as(y, x, xk), Moments(x.numel() // x.shape[1], mean, m2), invstd

    def forward_stats(self, x, weight, bias, eps, running_mean, running_var, momentum, nbt=None, guard=False,
                      want_output=True):  # fmt: skip
        """(y, (3, C) float64 statistics with rows mean, M2, invstd, plan), running averages updated.

        running_mean/running_var: None or plain vectors (:func:`is_plain_vector`). ``nbt``: None, or
        an int64 one-element CPU tensor (num_batches_tracked) to count the batch in; then momentum
        None means the cumulative factor 1/num_batches_tracked. ``guard``: the non-finite guard
        (a batch with a NaN/Inf mean or variance updates nothing, counter included; see
        bnlab.stats.update_running_stats_). ``want_output=False`` skips y.
        ``plan`` = (layout, N, C, L, dtype code, threads) describes x for :meth:`backward_fused`.
        """
        layout, n, c, length = layout_of(x)
        y = cpu_pool.empty_like(x) if want_output else None
        stats = torch.empty(3, c, dtype=_F64)
        w, wc, _w = param(weight)
        b, bc, _b = param(bias)
        rm, rmc = (running_mean.data_ptr(), _CODE[running_mean.dtype]) if running_mean is not None else (0, 0)
        rv, rvc = (running_var.data_ptr(), _CODE[running_var.dtype]) if running_var is not None else (0, 0)
        code = _CODE[x.dtype]
        nt = threads_for(x, (layout, n, c, length))
        skipped = self._lib.bn_forward_train(
            x.data_ptr(), 0 if y is None else y.data_ptr(), code, layout, n, c, length, w, wc, b, bc, eps,
            stats.data_ptr(), rm, rmc, rv, rvc, 0.0 if momentum is None else momentum,
            0 if nbt is None else nbt.data_ptr(), momentum is None, guard, nt, WAVE_PER_THREAD * nt,
        )  # fmt: skip
        if nbt is not None and skipped == 0:
            # counted through its data pointer: its version bumped, as torch.nn's add_(1) bumps it
            torch.autograd.graph.increment_version(nbt)
        return y, stats, (layout, n, c, length, code, nt)

    def train_forward_stats(self, x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
                            skip_nonfinite):  # fmt: skip
        # One kernel call, the running averages and the counter updated in it, as the modules' compiled
        # call updates them (bn_train_module); the base class's composition where it does not fit.
        nbt = num_batches_tracked
        plain_nbt = nbt is None or (nbt.is_cpu and nbt.dtype == torch.int64 and nbt.numel() == 1)
        if not (fits(x) and is_plain_vector(running_mean) and is_plain_vector(running_var) and plain_nbt):
            return super().train_forward_stats(x, weight, bias, eps, running_mean, running_var, momentum, nbt,
                                               skip_nonfinite)  # fmt: skip
        if nbt is None and momentum is None:
            momentum = 0.0  # no counter, no cumulative average (as torch.nn)
        y, stats, _ = self.forward_stats(x, weight, bias, eps, running_mean, running_var, momentum, nbt, skip_nonfinite)
        return y, stats

    def backward_entry(self, dy, x, stats, weight, plan, needs, bias_dtype):
        """CpuTrainFunction's gradients (dx, dweight, dbias, None) from one compiled call
        (``bn_backward_module``, cpu_kernels_py_backward.inc), or None where it is not set up or
        declines (dy in another dtype or memory format, a strided weight): then :meth:`backward_fused`."""
        if not COMPILED_CALLS["on"]:
            return None
        call = self._backward_entry
        if call is None:
            call = self._backward_entry = (self._lib.bn_backward_module if self.train_entry() is not None else False)
        return call(dy, x, stats, weight, plan, needs, bias_dtype) if call else None

    def eval_backward_entry(self, dy, x, stats, weight, plan, needs, bias_dtype):
        """CpuEvalFromKernel's first-order gradients (dx, dweight, dbias, None) from one compiled call
        (``bn_eval_backward_module``, cpu_kernels_py_backward.inc: the kernel of :meth:`eval_backward`,
        bn_eval_backward), or None where it is not set up or declines as :meth:`backward_entry`.
        stats: the (2, C) float64 rows mean, invstd the compiled eval call saved."""
        # Only the compiled eval call makes a CpuEvalFromKernel node, so the module is set up here.
        if not COMPILED_CALLS["on"]:
            return None
        return self._lib.bn_eval_backward_module(dy, x, stats, weight, plan, needs, bias_dtype)

    def backward_fused(self, dy, x, stats, weight, plan, need_input_grad, dweight, dbias):
        """dx (or None) from the forward's ``stats`` and ``plan``; writes Σdy·x̂ into dweight and Σdy into dbias.

        dweight/dbias: fresh contiguous (C,) tensors in the parameters' dtypes, or None.
        """
        layout, n, c, length, code, nt = plan
        dy = _like(dy, x)
        dx = cpu_pool.empty_like(x) if need_input_grad else None
        w, wc, _w = param(weight)
        ptr = stats.data_ptr()  # rows: mean, M2, invstd (float64)
        self._lib.bn_backward(
            dy.data_ptr(), x.data_ptr(), 0 if dx is None else dx.data_ptr(), code, layout, n, c, length,
            ptr, ptr + 16 * c, w, wc, float(n * length), 0,
            0 if dweight is None else dweight.data_ptr(), 0 if dweight is None else _CODE[dweight.dtype],
            0 if dbias is None else dbias.data_ptr(), 0 if dbias is None else _CODE[dbias.dtype],
            nt, WAVE_PER_THREAD * nt, 1,  # the forward's own batch mean: centred
        )  # fmt: skip
        return dx

    def backward(self, dy, x, mean, invstd, weight, count, need_input_grad, batch_mean=False):
        found = kernel_input(x)
        if found is None:
            return _PORTABLE.backward(dy, x, mean, invstd, weight, count, need_input_grad, batch_mean)
        xk = found[0]
        mean, invstd = _f64(mean), _f64(invstd)
        dx, sums = self.backward_sums(dy, xk, mean.data_ptr(), invstd.data_ptr(), weight, count, need_input_grad,
                                      batch_mean)  # fmt: skip
        sum_dy, sum_dy_xhat = sums.unbind()
        return laid_out_as(dx, x, xk), sum_dy_xhat, sum_dy

    def backward_sums(self, dy, x, mean_ptr, invstd_ptr, weight, count, need_input_grad, batch_mean):
        """(dx or None, (2, C) float64 sums Σdy, Σdy·x̂), given pointers to float64 (C,) mean and invstd
        (``batch_mean``: as for Backend.grad_sums)."""
        layout, n, c, length = layout_of(x)
        dy = _like(dy, x)
        dx = cpu_pool.empty_like(x) if need_input_grad else None
        sums = torch.empty(2, c, dtype=_F64)
        w, wc, _w = param(weight)
        nt = threads_for(x, (layout, n, c, length))
        self._lib.bn_backward(
            dy.data_ptr(), x.data_ptr(), 0 if dx is None else dx.data_ptr(), _CODE[x.dtype], layout, n, c, length,
            mean_ptr, invstd_ptr, w, wc, float(count), sums.data_ptr(), 0, 0, 0, 0, nt, WAVE_PER_THREAD * nt,
            int(batch_mean),
        )  # fmt: skip
        return dx, sums

    # -- primitives (SyncBatchNorm composes these around its collectives) -------------------------
    def moments(self, x):
        found = kernel_input(x)
        if found is None:
            return _PORTABLE.moments(x)
        x = found[0]
        _, stats, _ = self.forward_stats(x, None, None, 1.0, None, None, 0.0, want_output=False)
        return Moments(x.numel() // x.shape[1], stats[0], stats[1])

    def grad_sums(self, dy, x, mean, invstd, batch_mean=False):
        found = kernel_input(x)
        if found is None:
            return _PORTABLE.grad_sums(dy, x, mean, invstd, batch_mean)
        x = found[0]
        mean, invstd = _f64(mean), _f64(invstd)
        _, sums = self.backward_sums(dy, x, mean.data_ptr(), invstd.data_ptr(), None, 1, False, batch_mean)
        return sums[0], sums[1]

    def normalize(self, x, mean, invstd, weight, bias):
        found = kernel_input(x, elementwise=True)
        if found is None:
            return _PORTABLE.normalize(x, mean, invstd, weight, bias)
        xk, (layout, n, c, length) = found
        mean, invstd = _f64(mean), _f64(invstd)
        y = cpu_pool.empty_like(xk)
        w, wc, _w = param(weight)
        b, bc, _b = param(bias)
        self._lib.bn_normalize(
            xk.data_ptr(), y.data_ptr(), _CODE[xk.dtype], layout, n, c, length,
            mean.data_ptr(), invstd.data_ptr(), w, wc, b, bc, threads_for(xk),
        )  # fmt: skip
        return laid_out_as(y, x, xk)

    def eval_statistics(self, running_mean, running_var, eps):
        if not (is_plain_vector(running_mean) and is_plain_vector(running_var)):
            return None
        c = running_mean.shape[0]
        stats = torch.empty(2, c, dtype=_F64)
        bad = self._lib.bn_eval_stats(
            running_mean.data_ptr(), _CODE[running_mean.dtype], running_var.data_ptr(), _CODE[running_var.dtype],
            eps, stats.data_ptr(), c,
        )  # fmt: skip
        if bad:
            check_running_var_nonnegative(running_var)  # raises the error naming the channels
        return stats[0], stats[1]

    def eval_backward(self, dy, x, weight, mean, invstd, need_input_grad, need_weight_grad, need_bias_grad,
                      bias_dtype):  # fmt: skip
        # One kernel, bn_eval_backward: dx = dy·(weight·invstd) with the bits of the normalize
        # kernel on dy with mean 0 and no bias (the float32 products the torch ops form: scale =
        # float(invstd·weight), as they round it), and Σdy·x̂, Σdy from the backward kernel's
        # reduction (accumulated in float64), written in the parameters' dtypes; in one pass over
        # dy and x where that reduction walks by channel.
        found = kernel_input(x)
        if found is None:
            return None
        view, (x, (layout, n, c, length)) = x, found
        dy = _like(dy, x)
        mean, invstd = _f64(mean), _f64(invstd)
        nt = threads_for(x)
        w, wc, _w = param(weight)
        dx = cpu_pool.empty_like(x) if need_input_grad else None
        dw = torch.empty_like(weight) if need_weight_grad and weight is not None else None
        db = torch.empty(c, dtype=bias_dtype) if need_bias_grad and bias_dtype is not None else None
        self._lib.bn_eval_backward(
            dy.data_ptr(), x.data_ptr(), 0 if dx is None else dx.data_ptr(), _CODE[x.dtype], layout, n, c, length,
            mean.data_ptr(), invstd.data_ptr(), w, wc, 0 if dw is None else dw.data_ptr(),
            0 if dw is None else _CODE[dw.dtype], 0 if db is None else db.data_ptr(),
            0 if db is None else _CODE[db.dtype], nt, WAVE_PER_THREAD * nt,
        )  # fmt: skip
        return laid_out_as(dx, view, x), dw, db

    def grad_input(self, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        found = kernel_input(x, elementwise=True)
        if found is None:
            return _PORTABLE.grad_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
        xk, (layout, n, c, length) = found
        dy = _like(dy, xk)
        mean, invstd, sum_dy, sum_dy_xhat = _f64(mean), _f64(invstd), _f64(sum_dy), _f64(sum_dy_xhat)
        dx = cpu_pool.empty_like(xk)
        w, wc, _w = param(weight)
        self._lib.bn_grad_input(
            dy.data_ptr(), xk.data_ptr(), dx.data_ptr(), _CODE[xk.dtype], layout, n, c, length,
            mean.data_ptr(), invstd.data_ptr(), w, wc, sum_dy.data_ptr(), sum_dy_xhat.data_ptr(),
            float(count), threads_for(xk),
        )  # fmt: skip
        return laid_out_as(dx, x, xk)

    # -- whole-call hooks ----------------------------------------------------------------------------
    def train_forward(self, x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked=None,
                      skip_nonfinite=False):  # fmt: skip
        if not (is_plain_vector(running_mean) and is_plain_vector(running_var)):
            return None
        nbt = num_batches_tracked
        if nbt is not None and not (nbt.is_cpu and nbt.dtype == torch.int64 and nbt.numel() == 1):
            return None
        found = kernel_input(x)  # the copy, if any, on the autograd graph
        if found is None:
            return None
        config = (eps, self, running_mean, running_var, momentum, nbt, skip_nonfinite)
        return laid_out_as(apply_train(found[0], weight, bias, config), x, found[0])

    def eval_forward(self, x, running_mean, running_var, weight, bias, eps):
        found = kernel_input(x, elementwise=True)  # None also for a permuted view: the general path's ops
        if found is None or not (is_plain_vector(running_mean) and is_plain_vector(running_var)):
            return None
        view, (x, (layout, n, c, length)) = x, found
        y = cpu_pool.empty_like(x)
        w, wc, _w = param(weight)
        b, bc, _b = param(bias)
        bad = self._lib.bn_eval(
            x.data_ptr(), y.data_ptr(), _CODE[x.dtype], layout, n, c, length,
            running_mean.data_ptr(), _CODE[running_mean.dtype], running_var.data_ptr(), _CODE[running_var.dtype],
            w, wc, b, bc, eps, threads_for(x),
        )  # fmt: skip
        if bad:
            check_running_var_nonnegative(running_var)  # raises the error naming the channels
        return laid_out_as(y, view, x)
