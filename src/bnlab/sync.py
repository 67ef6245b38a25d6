"""``bnlab.SyncBatchNorm``: BN whose batch statistics span every process of a torch.distributed group.

The computation is the single-process layer's, with one collective inserted after each reduce
phase (bnlab.distributed): in the forward, every rank's (count, mean, M2) is all-gathered and
merged; in the backward, (Σdy, Σdy·x̂) is all-reduced before the elementwise input gradient.
The four primitives come from ``bnlab.backends.select_backend``, so the fast CPU and Triton
backends run here too. The step itself lives in bnlab.sync_steps, shared with the operators
that torch.compile traces (bnlab.custom_ops_sync). Works with gloo on CPU and NCCL on CUDA;
torch.nn.SyncBatchNorm runs on accelerators only, and DistributedDataParallel refuses it on CPU,
which is why this class derives from torch's ``_BatchNorm`` rather than from torch.nn.SyncBatchNorm.

Math: docs/math.md §2 (merging statistics) and §3 (backward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab import _checks, custom_ops, custom_ops_sync
from bnlab.backends import Backend, select_backend
from bnlab.convert import rebuild_batchnorm, replace_layers, warn_of_dropped_options
from bnlab.distributed import group_size
from bnlab.forward_handoff import forward_after_input_check, mark_after_check
from bnlab.fx_leaf import is_proxy, record_call
from bnlab.modules import _BatchNormMixin, rank_check
from bnlab.stats import Moments
from bnlab.sync_steps import sync_backward, sync_forward

__all__ = ["SyncBatchNorm"]

#: feature options (docs/features.md) that convert_sync_batchnorm carries over, and those it drops
_SYNCED = ("skip_nonfinite", "accumulation_steps")
_NOT_SYNCED = ("virtual_batch_size", "renorm")


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = BN(x) with the statistics of the whole group's batch.

    forward(x, weight, bias, eps, process_group, backend) -> (y, count, mean, m2), where count
    (0-dim), mean and m2 ((C,)) are the group's float64 statistics, returned non-differentiable
    for the running-average update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, process_group, backend: Backend):
        y, count, mean, m2, invstd, local_mean = sync_forward(x, weight, bias, eps, process_group, backend)
        ctx.save_for_backward(x, weight, mean, invstd, count, local_mean)
        ctx.process_group = process_group
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(count, mean, m2)
        return y, count, mean, m2

    @staticmethod
    def backward(ctx, dy: Tensor, _dcount, _dmean, _dm2):
        # The collectives are not differentiable. once_differentiable raised only where dy itself
        # required grad; with a dy that did not (a gradient penalty through BN and a constant
        # scale), create_graph=True returned an input gradient without BN's dependence on x, and
        # the second derivative came out wrong without a word (the forty-ninth session's audit).
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError("SyncBatchNorm: a backward with create_graph=True (double backward, gradient "
                               "penalties) is not supported through its collectives; for such a step use "
                               "bnlab.BatchNorm*d on each rank's batch, or one process")
        x, weight, mean, invstd, count, local_mean = ctx.saved_tensors
        dx, dw, db = sync_backward(
            dy, x, weight, mean, invstd, count, local_mean, ctx.process_group, ctx.backend, ctx.needs_input_grad[:3],
            ctx.bias_dtype,
        )
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
    A backward with ``create_graph=True`` (double backward) raises a RuntimeError: the
    collectives are not differentiable.
    Under ``torch.compile`` the synchronised step is one pair of operators
    (bnlab.custom_ops_sync): the graph stays whole and computes the eager bits.

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

    #: its forward checks the input, then hands on (bnlab.forward_handoff)
    _asks_after_input_check = True

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

    @rank_check  # any rank from 2: module_forward's empty _ranks
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
        if is_proxy(input):  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
            return record_call(self, (input,), {})
        x = _checks.check_input(input)
        self._check_input_dim(x)
        return self._forward_after_input_check(x)

    def _forward_after_input_check(self, x: Tensor) -> Tensor:
        """:meth:`forward` of a tensor ``x`` (N, C, *) that ``_check_input_dim`` has passed (also
        SyncBatchNormAct2d's, which checks first: bnlab.forward_handoff): BN's forward
        without a group to synchronise over, else the synchronised step."""
        self._check_channels(x)  # first, as torch.nn (before the group's membership is asked)
        if not self._needs_sync():
            return forward_after_input_check(SyncBatchNorm, self, x)
        self._check_vectors(x)
        if custom_ops.tracing(x):  # the same step as one operator: the compiled graph stays whole
            y, stats = custom_ops_sync.sync_train(x, self.weight, self.bias, self.eps, self.process_group)
        else:
            y, count, mean, m2 = _SyncBatchNormFunction.apply(
                x, self.weight, self.bias, self.eps, self.process_group, select_backend(x)
            )
            stats = Moments(count, mean, m2)
        # After the forward succeeded: a batch rejected on every rank changes no state anywhere.
        # The local layer's update path: the non-finite guard, accumulation_steps and momentum=None
        # behave exactly as in bnlab.BatchNorm*d, with the group's statistics.
        if self.track_running_stats and self.running_mean is not None:
            self._record_batch_stats(stats)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BN layer in ``module`` with a bnlab SyncBatchNorm that keeps its state.

        Converts torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, bnlab's BatchNorm layers and
        any other subclass of torch's ``_BatchNorm``, as torch.nn.SyncBatchNorm.convert_sync_batchnorm
        does; a ``bnlab.BatchNormAct2d`` becomes a ``bnlab.SyncBatchNormAct2d``, keeping its ReLU
        and residual add. The new layer takes over the old one's Parameter and buffer objects (no
        copy: an optimizer built before the conversion keeps working), its training flag and its
        qconfig, and bnlab's ``skip_nonfinite`` and ``accumulation_steps``, which it honours too;
        Ghost BN and Batch Renormalization it has not, and a layer with either set is converted
        with a UserWarning saying so (as ``bnlab.convert(..., to="torch")`` warns).

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

        def replacement(layer: nn.Module, _where: str) -> nn.Module | None:
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                return None
            return cls._from_batchnorm(layer, process_group)

        return replace_layers(module, replacement)

    @classmethod
    def _from_batchnorm(cls, old: nn.modules.batchnorm._BatchNorm, process_group) -> "SyncBatchNorm":
        """A SyncBatchNorm with old's configuration and mode, holding old's parameters and buffers."""
        if isinstance(old, nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
            raise ValueError(
                f"module: expected BN layers whose num_features is known, got an uninitialized "
                f"{type(old).__name__}; run one batch through the model before converting it"
            )
        from bnlab.fused import ActLayerMixin  # here: bnlab.sync_act imports this module
        from bnlab.sync_act import SyncBatchNormAct2d

        target, extra = cls, {}
        if isinstance(old, ActLayerMixin):  # BatchNormAct2d, or a SyncBatchNormAct2d converted again
            target, extra = SyncBatchNormAct2d, {"activation": old.activation, "residual": old.residual}
        warn_of_dropped_options(old, "convert_sync_batchnorm", f"bnlab.{target.__name__}", _NOT_SYNCED)
        new = rebuild_batchnorm(old, target, process_group=process_group, **extra)
        for name in _SYNCED:  # options the synchronised layer's running-average update honours
            if name in old.__dict__:
                setattr(new, name, old.__dict__[name])
        if hasattr(old, "qconfig"):
            new.qconfig = old.qconfig
        return new


# what SyncBatchNorm's forward does once the input has passed _check_input_dim (bnlab.forward_handoff)
mark_after_check(SyncBatchNorm.forward, SyncBatchNorm._forward_after_input_check)
