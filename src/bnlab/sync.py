"""``bnlab.SyncBatchNorm``: BN whose batch statistics span every process of a torch.distributed group.

The computation is the single-process layer's, with one collective inserted after each reduce
phase (bnlab.distributed): in the forward, every rank's (count, mean, M2) is all-gathered and
merged; in the backward, (Σdy, Σdy·x̂) is all-reduced before the elementwise input gradient.
The four primitives come from ``bnlab.backends.select_backend``, so the fast CPU and Triton
backends run here too. Works with gloo on CPU and NCCL on CUDA; torch.nn.SyncBatchNorm runs on
accelerators only, and DistributedDataParallel refuses it on CPU, which is why this class
derives from torch's ``_BatchNorm`` rather than from torch.nn.SyncBatchNorm.

Math: docs/math.md §2 (merging statistics) and §3 (backward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnlab import _checks
from bnlab.backends import Backend, select_backend
from bnlab.convert import rebuild_batchnorm
from bnlab.distributed import all_reduce_grad_sums, gather_moments, group_size
from bnlab.modules import _BatchNormMixin
from bnlab.stats import Moments, finalize

__all__ = ["SyncBatchNorm"]


def _raise_if_one_value(local_count: int, counts: Tensor) -> None:
    """Raise the same ValueError on every rank when the group's batch has one value per channel.

    Only a rank whose own batch has at most one value per channel reads the gathered counts
    (one device-to-host copy, on CUDA a wait for the all_gather): a rank with two or more knows
    without looking that the global count is >= 2. If the global count is 1, every rank has at
    most one value, so every rank looks and every rank raises, after the collective that all of
    them joined: none is left waiting in a collective that its peers never enter. The message
    holds only what every rank knows, so it is the same everywhere.
    """
    if local_count > 1:
        return
    per_rank = [int(c) for c in counts.tolist()]
    if sum(per_rank) == 1:
        raise ValueError(
            f"input: expected more than 1 value per channel when training, got 1 value per channel over "
            f"the {len(per_rank)} processes of the group (values per channel on each rank: {per_rank}); "
            f"every rank raises this same error; use eval mode or a larger batch"
        )


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = BN(x) with the statistics of the whole group's batch.

    forward(x, weight, bias, eps, process_group, backend) -> (y, count, mean, m2), where count
    (0-dim), mean and m2 ((C,)) are the group's float64 statistics, returned non-differentiable
    for the running-average update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, process_group, backend: Backend):
        local = backend.moments(x)
        stats, counts = gather_moments(local, process_group)  # collective 1 of 2
        _raise_if_one_value(_checks.values_per_channel(x), counts)
        mean, _, invstd = finalize(stats, eps)
        y = backend.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, invstd, stats.count)
        ctx.process_group = process_group
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(stats.count, stats.mean, stats.m2)
        return y, stats.count, stats.mean, stats.m2

    @staticmethod
    @once_differentiable  # the collective is not differentiable: a double backward raises clearly
    def backward(ctx, dy: Tensor, _dcount, _dmean, _dm2):
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xhat = ctx.backend.grad_sums(dy, x, mean, invstd)
        dx = None
        if need_x:
            # Parameter gradients stay local (DDP reduces them); dx needs the group's sums.
            # needs_input_grad is a property of the model, equal on every rank, so either all
            # ranks enter this collective or none does.
            total_dy, total_dy_xhat = all_reduce_grad_sums(sum_dy, sum_dy_xhat, ctx.process_group)  # 2 of 2
            dx = ctx.backend.grad_input(dy, x, mean, invstd, weight, total_dy, total_dy_xhat, count)
        dw = sum_dy_xhat.to(weight.dtype) if (weight is not None and need_w) else None
        db = sum_dy.to(ctx.bias_dtype) if (ctx.bias_dtype is not None and need_b) else None
        return dx, dw, db, None, None, None


class SyncBatchNorm(_BatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """BN over (N, C, *) inputs of any rank >= 2, with batch statistics shared by a process group.

    Drop-in for ``torch.nn.SyncBatchNorm``: same arguments, parameters (weight, bias), buffers
    (running_mean, running_var, num_batches_tracked) and state dict, which also loads into and
    from ``torch.nn.BatchNorm1d/2d/3d`` and bnlab's BatchNorm layers. Runs on CPU (gloo) and CUDA
    (NCCL), inside DistributedDataParallel or without it.

    In training, each channel is normalized with the mean and biased variance of the
    concatenation of every rank's batch, and the running averages (identical on every rank)
    are updated with the group's unbiased variance: the result is single-process BN on the
    global batch. Per-rank batches may differ in size and may be empty (such a rank still
    joins the collectives, so it must run forward and backward like the others). A step costs
    one all_gather in the forward and one all_reduce in the backward (none when no input
    gradient is needed); on CUDA there is no other host synchronisation. A global batch of one
    value per channel raises the same ValueError on every rank.

    In eval mode, with a group of one process, or when torch.distributed has no process group,
    the layer is the local bnlab BatchNorm and issues no collective.

    Parameter gradients are those of this rank's loss (DDP averages them over the ranks). With
    uneven batches and a per-rank mean loss, DDP's average is not the global mean: scale each
    rank's summed loss by world_size / global_batch to train exactly as one process would.
    Double backward (``create_graph=True``) is not supported through the collectives.

    Args:
        num_features: C.
        eps: added to the variance before the square root (> 0).
        momentum: weight of the new batch in the running averages (0.1), or None for a cumulative average.
        affine: learn weight (γ, init 1) and bias (β, init 0).
        track_running_stats: keep running averages for eval mode; if False, eval uses the local batch.
        process_group: the ``torch.distributed`` group to synchronise over; None: the whole world.
        device, dtype: of the parameters and buffers.
        bias: with affine, learn β as well (keyword only).

    Shape: input (N, C, *) with rank >= 2; output the same. N may differ between ranks.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"input: SyncBatchNorm expected a tensor of shape (N, C, *) with rank >= 2, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    def _needs_sync(self) -> bool:
        """Training on a group of more than one process: the only case that issues collectives."""
        return self.training and group_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (N, C, *) with the statistics of the group's batch (see the class docstring)."""
        x = _checks.check_input(input)
        self._check_input_dim(x)
        self._check_channels(x)
        if not self._needs_sync():
            return super().forward(x)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _checks.check_channel_vector(getattr(self, name), name, self.num_features, x)
        y, count, mean, m2 = _SyncBatchNormFunction.apply(
            x, self.weight, self.bias, self.eps, self.process_group, select_backend(x)
        )
        # After the forward succeeded: a batch rejected on every rank changes no state anywhere.
        # The local layer's update path: the non-finite guard, accumulation_steps and momentum=None
        # behave exactly as in bnlab.BatchNorm*d, with the group's statistics.
        if self.track_running_stats and self.running_mean is not None:
            self._record_batch_stats(Moments(count, mean, m2))
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BN layer in ``module`` with a bnlab SyncBatchNorm that keeps its state.

        Converts torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, bnlab's BatchNorm layers and
        any other subclass of torch's ``_BatchNorm``, as torch.nn.SyncBatchNorm.convert_sync_batchnorm
        does. The new layer takes over the old one's Parameter and buffer objects (no copy: an
        optimizer built before the conversion keeps working), its training flag and its qconfig.

        Args:
            module: a model, or a single BN layer.
            process_group: the group every converted layer synchronises over; None: the whole world.

        Returns:
            ``module`` itself, changed in place, unless ``module`` is a BN layer, in which case its
            replacement.

        Raises:
            ValueError: a lazy BN layer whose size is not known yet (run one batch through it first).
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            converted = cls._from_batchnorm(module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted

    @classmethod
    def _from_batchnorm(cls, old: nn.modules.batchnorm._BatchNorm, process_group) -> "SyncBatchNorm":
        """A SyncBatchNorm with old's configuration and mode, holding old's parameters and buffers."""
        if isinstance(old, nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
            raise ValueError(
                f"module: expected BN layers whose num_features is known, got an uninitialized "
                f"{type(old).__name__}; run one batch through the model before converting it"
            )
        new = rebuild_batchnorm(old, cls, process_group=process_group)
        if hasattr(old, "qconfig"):
            new.qconfig = old.qconfig
        return new
