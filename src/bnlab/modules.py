"""``bnlab.BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Each class subclasses its torch.nn counterpart, so the constructor, the parameter and buffer
names, ``reset_parameters``, old-checkpoint migration and every ``isinstance(m, nn.BatchNorm2d)``
check in user code (weight-decay exclusion, freezing, fusion) behave exactly as before; the
forward and backward computation is bnlab's (bnlab.functional). The three classes differ only in
the input ranks they accept.

Math: docs/math.md. Conventions (momentum, variance estimators): docs/conventions.md.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from bnlab import _checks
from bnlab._fastpath import module_forward
from bnlab.functional import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNLAB_BATCHNORM_TYPES"]

# torch added the keyword-only ``bias`` argument to _NormBase in 2.x; older releases lack it.
_TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


class _BatchNormMixin:
    """Shared state checks and forward for bnlab's BatchNorm classes (put before the torch.nn base)."""

    #: input ranks accepted by the class, e.g. (2, 3) for BatchNorm1d.
    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        num_features = _checks.check_num_features(num_features)
        eps = _checks.check_eps(eps)
        momentum = _checks.check_momentum(momentum)
        if dtype is not None and dtype not in _checks.FLOATING_DTYPES:
            raise TypeError(f"dtype: expected a floating-point dtype for the parameters and statistics, got {dtype}")
        kwargs = {"bias": bias} if _TORCH_HAS_BIAS_KWARG else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        if not _TORCH_HAS_BIAS_KWARG and affine and not bias:
            self.register_parameter("bias", None)

    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_input_rank(input, self._ranks, type(self).__name__)

    def _check_channels(self, x: Tensor) -> None:
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"input: expected {self.num_features} channels on dim 1 (num_features={self.num_features}), "
                f"got input of shape {tuple(x.shape)} with {x.shape[1]}"
            )

    def _momentum_factor(self) -> float:
        """The weight of this batch in the running averages; counts the batch when tracking.

        ``momentum=None`` means a cumulative average: the k-th batch gets weight 1/k.
        """
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (N, C, *) per channel; see the class docstring for the accepted ranks."""
        y = module_forward(self, input)  # the common case, validated once (bnlab._fastpath)
        if y is not None:
            return y
        x = _checks.check_input(input)
        self._check_input_dim(x)
        self._check_channels(x)
        if self.training:
            # Validate before num_batches_tracked moves, so a rejected batch changes no state.
            _checks.check_training_batch(x)
        factor = self._momentum_factor()
        # Batch statistics in training, and in eval when there are no running statistics to use.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running buffers are passed when they are read (eval) or updated (training with tracking).
        pass_buffers = not self.training or self.track_running_stats
        return batch_norm(
            x,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # torch reports a shape mismatch in terms of tensors; say which layer size the checkpoint had.
        for key in ("weight", "bias", "running_mean", "running_var"):
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and getattr(self, key, None) is not None and value.shape != (self.num_features,):
                error_msgs.append(
                    f"{prefix}{key}: expected shape ({self.num_features},) for {type(self).__name__}"
                    f"(num_features={self.num_features}), got {tuple(value.shape)}: the checkpoint was saved "
                    f"from a layer with a different number of channels"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """BN over a 2D (N, C) input (per feature, over the batch) or 3D (N, C, L) input (per channel, over N and L).

    Same arguments, parameters (weight, bias), buffers (running_mean, running_var,
    num_batches_tracked) and state dict as ``torch.nn.BatchNorm1d``.

    Args:
        num_features: C.
        eps: added to the variance before the square root (> 0).
        momentum: weight of the new batch in the running averages (0.1), or None for a cumulative average.
        affine: learn weight (γ, init 1) and bias (β, init 0).
        track_running_stats: keep running averages for eval mode; if False, eval uses batch statistics.
        device, dtype: of the parameters and buffers.
        bias: with affine, learn β as well (keyword only).

    Shape: input (N, C) or (N, C, L); output the same.
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """BN over a 4D (N, C, H, W) input, per channel over N, H and W (seed 000's conv BN).

    Same arguments, parameters, buffers and state dict as ``torch.nn.BatchNorm2d``; see
    :class:`BatchNorm1d` for the arguments. Shape: input (N, C, H, W); output the same.
    channels_last inputs give channels_last outputs.
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """BN over a 5D (N, C, D, H, W) input, per channel over N, D, H and W.

    Same arguments, parameters, buffers and state dict as ``torch.nn.BatchNorm3d``; see
    :class:`BatchNorm1d` for the arguments. Shape: input (N, C, D, H, W); output the same.
    """

    _ranks = (5,)


BNLAB_BATCHNORM_TYPES = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
