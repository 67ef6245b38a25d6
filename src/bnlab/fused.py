"""``bnlab.BatchNormAct2d``: BatchNorm2d, an optional residual add, and ReLU, as one layer.

y = relu(BN(x) + residual). On a GPU (the Triton backend) the training step is fused: the
forward writes y and a 1-bit ReLU mask (not z <= 0: z > 0 or NaN, where torch's ReLU backward
passes dy) instead of keeping y for the backward, and the backward reads that mask, x and dy
once per pass; eval mode is one elementwise kernel. Elsewhere (the CPU backends, any backend
without fused kernels) the layer is bnlab.BatchNorm2d's own call, on the CPU its compiled call,
followed by the add and the ReLU: on the CPU kernels, from 131,072 values, one pass in place on
the BN output (:class:`AddReluFunction`, backends/cpu_act.py), whose backward reads ReLU's mask
from the saved output in one pass, as torch's ReLU reads it; forward+backward 1.21-4.15x torch.nn's BN then ReLU
on the benchmark's conv shapes (docs/benchmarks.md), with the bits of bnlab.BatchNorm2d followed
by torch's add and ReLU. Elsewhere torch's ops do the add and the ReLU.

The layer subclasses bnlab.BatchNorm2d and adds no parameter or buffer: its state dict is a
BatchNorm2d state dict, and loads both ways. bnlab.fold folds it into a preceding convolution
(keeping the ReLU) when it has no residual input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab import _checks, composite, custom_ops
from bnlab._fastpath import module_forward
from bnlab.autograd import differentiable_train_grads, param_grads
from bnlab.backends import cpu_act, select_backend
from bnlab.backends.autograd_apply import direct_apply
from bnlab.forward_handoff import forward_after_input_check
from bnlab.functional import batch_norm
from bnlab.fx_leaf import is_proxy, record_call
from bnlab.modules import BatchNorm2d
from bnlab.stats import Moments, count_and_update_

__all__ = ["BatchNormAct2d", "BatchNormActFunction"]


def _unpack_bits(mask: Tensor, like: Tensor, rows: int, k: int) -> Tensor:
    """The boolean not z <= 0 of the Triton kernels' 1-bit mask, shaped and strided like the input.

    The mask holds ``rows`` rows of ``k`` values in storage order, each row padded to whole bytes
    (bit j % 8 of byte j // 8 of its row); see bnlab.backends.triton_elementwise.
    """
    bits = (mask.view(rows, -1).unsqueeze(2) >> torch.arange(8, device=mask.device, dtype=torch.uint8)) & 1
    flat = bits.flatten(1)[:, :k].reshape(-1).bool()
    return flat.as_strided(like.shape, like.stride())  # like is dense: its strides index the storage


def add_relu_ops(z: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """act(z + residual) in torch's own ops (differentiable, traceable): every path of the BN +
    activation layers but the fused kernels' and the CPU kernels' in-place pass (then_add_relu),
    which give the same bits."""
    z = z + residual if residual is not None else z
    return torch.relu(z) if relu else z


class BatchNormActFunction(torch.autograd.Function):
    """y = act(BN(x) + residual) with batch statistics, for backends with fused kernels (the Triton
    backend's act_forward/act_backward); config = (eps, backend, running_mean, running_var,
    momentum, num_batches_tracked, skip_nonfinite, relu). Where those kernels decline an input, the
    backend's BN plus torch ops.

    ReLU's mask, not z <= 0, is the fused kernels' 1-bit mask; where they decline, the output y is
    saved, as torch's ReLU keeps its result, and the backward masks dy with torch's ReLU backward
    (threshold_backward): not y <= 0 is not z <= 0, NaN included. As after torch's ReLU, y then
    must not be changed in place before the backward (autograd's version check says so).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, config):
        eps, backend, running_mean, running_var, momentum, counter, guard, relu = config
        fused = getattr(backend, "act_forward", None)
        out = None
        if fused is not None:
            out = fused(x, weight, bias, eps, running_mean, running_var, momentum, counter, guard, residual, relu)
        if out is not None:
            y, ctx.extra = out
            ctx.fused = True
        else:
            z, stats, invstd = backend.forward_train(x, weight, bias, eps)
            count_and_update_(running_mean, running_var, counter, stats, momentum, guard)
            y = add_relu_ops(z, residual, relu)
            ctx.extra = (stats.mean, invstd, stats.count)
            ctx.fused = False
        if relu and not ctx.fused:
            ctx.save_for_backward(x, weight, y)
        else:
            ctx.save_for_backward(x, weight)
        ctx.config = (eps, backend, None if bias is None else bias.dtype, relu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *output = ctx.saved_tensors
        need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
        eps, backend, bias_dtype, relu = ctx.config
        if torch.is_grad_enabled():
            # create_graph=True: ReLU's mask is a constant; BN's backward in differentiable torch ops.
            mask = None
            if output:
                mask = ~(output[0] <= 0)
            elif relu:
                _, _, packed, p = ctx.extra
                mask = _unpack_bits(packed, x, p.rows, p.k)
            dz = torch.where(mask, dy, 0.0) if mask is not None else dy  # +0 where masked, as ReLU's backward
            dx, dw, db = differentiable_train_grads(dz, x, weight, eps, bias_dtype, (need_x, need_w, need_b))
            return dx, dw, db, (dz if need_res else None), None
        if ctx.fused:
            dw = torch.empty_like(weight) if need_w else None
            db = torch.empty(x.shape[1], dtype=bias_dtype, device=x.device) if need_b else None
            dx, dres = backend.act_backward(dy, x, weight, ctx.extra, need_x, need_res, dw, db)
            return dx, dw, db, dres, None
        # torch's ReLU backward on the saved output: +0 where y <= 0, whatever dy there
        dz = torch.ops.aten.threshold_backward(dy, output[0], 0) if output else dy
        mean, invstd, count = ctx.extra
        dx, sum_dy_xhat, sum_dy = backend.backward(dz, x, mean, invstd, weight, count, need_x, batch_mean=True)
        dw, db = param_grads(sum_dy_xhat, sum_dy, weight, bias_dtype, need_w, need_b)
        return dx, dw, db, (dz if need_res else None), None


#: BatchNormActFunction.apply without torch's Python wrapper where it is idle (about 3 us a call)
_apply_act = direct_apply(BatchNormActFunction)


class AddReluFunction(torch.autograd.Function):
    """y = act(z + residual) in place on z, a BN output of this call, by the CPU kernels
    (bnlab.backends.cpu_act); the ReLU's mask read from the saved output in the backward, as
    torch's ReLU reads it (so the output must not be changed in place before the backward).

    forward(z, residual, relu) -> y (z itself, marked dirty).
    """

    @staticmethod
    def forward(ctx, z, residual, relu):
        cpu_act.add_relu_(z, residual, relu)
        ctx.mark_dirty(z)
        if relu:
            ctx.save_for_backward(z)
        ctx.with_residual = residual is not None
        return z

    @staticmethod
    def backward(ctx, dy):
        dz = dy
        if ctx.saved_tensors:
            (y,) = ctx.saved_tensors
            # torch's ReLU backward: +0 where y <= 0, whatever dy there; under create_graph torch's
            # own op, differentiable in dy
            if torch.is_grad_enabled():
                dz = torch.ops.aten.threshold_backward(dy, y, 0)
            else:
                dz = cpu_act.relu_backward(dy, y)
        return dz, (dz if ctx.with_residual else None), None


_apply_add_relu = direct_apply(AddReluFunction)


def then_add_relu(z: Tensor, x: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """act(z + residual) for z = BN(x) computed by bnlab.BatchNorm2d's call: in place by the CPU
    kernels where they take z (a fresh output, not x's memory, large enough: cpu_act.takes) and
    nothing traces or transforms the call; else torch's ops (the same bits)."""
    if residual is None and not relu:
        return z
    # (transforms_active: forward-mode AD, torch.func and torch.jit.trace take torch's ops; asked
    # first, as vmap's batched tensors have no data pointer to compare)
    if composite.transforms_active():
        return add_relu_ops(z, residual, relu)
    fresh = z._base is None and z.data_ptr() != x.data_ptr()
    if fresh and cpu_act.takes(z):
        if torch.is_grad_enabled() and (z.requires_grad or (residual is not None and residual.requires_grad)):
            return _apply_add_relu(z, residual, relu)
        return cpu_act.add_relu_(z, residual, relu)
    return add_relu_ops(z, residual, relu)


def check_act_options(activation: object, residual: object) -> tuple[str | None, bool]:
    """The ``activation`` and ``residual`` arguments of the BN + activation layers, checked."""
    if activation not in ("relu", None):
        raise ValueError(f"activation: expected 'relu' or None, got {activation!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__} {residual!r}")
    return activation, residual


def check_residual(expected: bool, x: Tensor, residual: object) -> None:
    """A call's residual against the layer's ``residual`` option: given exactly when the layer was
    built with residual=True, and then a tensor of x's shape, dtype and device."""
    if not expected:
        if residual is not None:
            raise TypeError("residual: this layer was built with residual=False; got a residual input")
        return
    if residual is None:
        raise TypeError("residual: this layer was built with residual=True; forward(x, residual) needs it, got None")
    if not isinstance(residual, Tensor) or residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        got = f"{tuple(residual.shape)} {residual.dtype} on {residual.device}" if isinstance(residual, Tensor) else type(residual).__name__
        raise ValueError(f"residual: expected a tensor like the input, {tuple(x.shape)} {x.dtype} on {x.device}; got {got}")


class ActLayerMixin:
    """What the BN + activation layers share (BatchNormAct2d, bnlab.sync_act.SyncBatchNormAct2d):
    their options in the repr, their fold, and the checks of a call. Put before the BN base class."""

    activation: str | None
    residual: bool

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, residual={self.residual}"

    def folded_replacement(self) -> nn.Module:
        """What bnlab.fold leaves in this layer's place once BN is folded into the convolution."""
        return nn.ReLU() if self.activation == "relu" else nn.Identity()

    def _checked_call(self, input: object, residual: object) -> Tensor:
        """The input of a call, checked with its residual before anything runs (a refused call
        changes no state)."""
        x = _checks.check_input(input)
        self._check_input_dim(x)
        self._check_channels(x)
        check_residual(self.residual, x, residual)
        return x


class BatchNormAct2d(ActLayerMixin, BatchNorm2d):
    """BatchNorm2d followed by an optional residual add and ReLU: ``y = relu(BN(x) + residual)``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as
            bnlab.BatchNorm2d (and torch.nn.BatchNorm2d).
        activation: ``"relu"`` (default) or None for no activation (BN + residual only).
        residual: if True, ``forward(x, residual)`` adds ``residual`` (same shape, dtype and
            device as x) before the activation, as at the end of a ResNet block.

    Shape: x and residual (N, C, H, W); output the same, in x's memory format.

    It is a ``torch.nn.BatchNorm2d`` (state dict, ``isinstance``), so torch's own tools that take
    BatchNorm2d layers see plain BN: ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` drop its ReLU and residual add. Use
    ``bnlab.fold`` and ``bnlab.SyncBatchNorm.convert_sync_batchnorm``, which keep them.
    """

    #: its forward checks the input, then hands on (bnlab.forward_handoff)
    _asks_after_input_check = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True, activation="relu", residual=False):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation, self.residual = check_act_options(activation, residual)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """relu(BN(input) + residual); see the class docstring."""
        if is_proxy(input):  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
            return record_call(self, (input,), {} if residual is None else {"residual": residual})
        x = self._checked_call(input, residual)
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if batch_statistics:
            _checks.check_training_batch(x)  # more than one value per channel, as torch.nn
        relu = self.activation == "relu"
        if custom_ops.tracing(x):
            # Traced by torch.compile / torch.export: BN as one node of the graph (bnlab.custom_ops),
            # the add and the ReLU as torch ops, which the compiler fuses with their neighbours.
            z = module_forward(self, x)
            if z is not None:
                return add_relu_ops(z, residual, relu)
        backend = select_backend(x)
        if getattr(backend, "act_forward", None) is None:
            # No fused kernels (the CPU backends): BN as bnlab.BatchNorm2d computes it (on the CPU
            # its compiled call), then the add and the ReLU, in one kernel pass in place on that
            # output where the kernels take it (bnlab.backends.cpu_act); the same bits as
            # bnlab.BatchNorm2d followed by torch's add and ReLU
            return then_add_relu(forward_after_input_check(BatchNormAct2d, self, x), x, residual, relu)
        if batch_statistics:
            track = self.training and self.track_running_stats
            rm, rv = (self.running_mean, self.running_var) if track else (None, None)
            counter = self.num_batches_tracked if track else None
            for name, v in (("weight", self.weight), ("bias", self.bias), ("running_mean", rm), ("running_var", rv)):
                _checks.check_channel_vector(v, name, x.shape[1], x)
            _checks.check_buffers_updatable(rm, rv, counter)  # the fused kernels would write them in place
            momentum = _checks.check_momentum(self.momentum)
            if momentum is None and counter is None:
                momentum = 0.0  # no counter, no cumulative average (as torch.nn)
            guard = bool(self.__dict__.get("skip_nonfinite", getattr(type(self), "skip_nonfinite", True)))
            config = (_checks.check_eps(self.eps), backend, rm, rv, momentum, counter, guard, relu)
            if composite.transforms_active():  # forward-mode AD or torch.func: bnlab.composite's torch ops
                z, mean, m2 = composite.train_forward(x, self.weight, self.bias, config[0])
                count_and_update_(rm, rv, counter, Moments(_checks.values_per_channel(x), mean, m2), momentum, guard)
                return add_relu_ops(z, residual, relu)
            return _apply_act(x, self.weight, self.bias, residual, config)
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias, residual))
        if not grads and hasattr(backend, "act_eval") and not composite.transforms_active():
            y = backend.act_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, residual, relu)
            if y is not None:
                return y
        y = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return add_relu_ops(y, residual, relu)
