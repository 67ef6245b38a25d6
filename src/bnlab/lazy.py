"""``bnlab.LazyBatchNorm1d/2d/3d``: torch.nn's lazy BN layers, with num_features taken from the first input.

As ``torch.nn.LazyBatchNorm2d``, the layer is built without a channel count; its parameters and
running statistics are uninitialized until the first call, which gives them the input's C
channels, initializes them as a BatchNorm2d would, and turns the layer into a
``bnlab.BatchNorm2d`` (``cls_to_become``). So ``bnlab.convert`` can swap a model's torch.nn lazy
layers too, before they have seen data: left torch's, they would become torch.nn layers at the
first call.

Two things differ from torch.nn, both where torch.nn's lazy layer goes wrong:

- the first input is checked (type, rank) before it sizes anything, so a wrong input raises
  the layers' usual errors and leaves the layer lazy (torch.nn's LazyBatchNorm2d sizes itself
  from a 2-D (4, 5) input, becoming a BatchNorm2d of 5 channels, before it raises; a 1-D input
  to LazyBatchNorm1d raises an IndexError);
- ``num_features`` follows what the layer holds: loaded from a checkpoint, it is the
  checkpoint's channel count; without parameters or statistics (affine=False,
  track_running_stats=False), the first input's. torch.nn's lazy layers keep 0 in both cases.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnlab import _checks
from bnlab.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin

__all__ = ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]

_HELD = ("weight", "bias", "running_mean", "running_var")


class _LazyBatchNormMixin(_BatchNormMixin):
    """bnlab's BN (forward, options, checks) on torch.nn's lazy base (put before the torch.nn class)."""

    _lazy = True

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        **keywords,
    ) -> None:
        """torch.nn.LazyBatchNorm*d's arguments; ``keywords``: ``bias`` and the feature options of
        :class:`bnlab.BatchNorm1d` (keyword only), checked there."""
        super().__init__(None, eps, momentum, affine, track_running_stats, device, dtype, **keywords)

    def initialize_parameters(self, input: Tensor, mask: Tensor | None = None) -> None:
        """The first call's pre-hook (LazyModuleMixin): size and initialize from ``input`` (N, C, *)."""
        x = _checks.check_input(input)
        self._check_input_dim(x)
        if self.has_uninitialized_params():
            super().initialize_parameters(x)  # torch.nn's: num_features = C, materialize, reset_parameters
        elif self.num_features == 0:
            self.num_features = _held_channels(self) or x.shape[1]

    def _load_from_state_dict(self, state_dict, prefix, *rest) -> None:
        if self.num_features != 0:
            return super()._load_from_state_dict(state_dict, prefix, *rest)
        # Not sized yet: torch's load hook gives the tensors the checkpoint's shapes, which the
        # mixin's check against num_features = 0 would refuse.
        super(_BatchNormMixin, self)._load_from_state_dict(state_dict, prefix, *rest)
        if not self.has_uninitialized_params():
            self.num_features = _held_channels(self)


def _held_channels(layer: nn.Module) -> int:
    """The channel count of the first parameter or statistic the layer holds (0 if none)."""
    for name in _HELD:
        tensor = getattr(layer, name, None)
        if tensor is not None:
            return tensor.shape[0]
    return 0


class LazyBatchNorm1d(_LazyBatchNormMixin, nn.LazyBatchNorm1d):
    """:class:`bnlab.BatchNorm1d` whose num_features is inferred from the first input (N, C) or (N, C, L).

    Same arguments as ``torch.nn.LazyBatchNorm1d`` and the feature options of
    :class:`bnlab.BatchNorm1d` (keyword only); becomes a ``bnlab.BatchNorm1d`` at its first call.
    """

    cls_to_become = BatchNorm1d
    _ranks = BatchNorm1d._ranks


class LazyBatchNorm2d(_LazyBatchNormMixin, nn.LazyBatchNorm2d):
    """:class:`bnlab.BatchNorm2d` whose num_features is inferred from the first input (N, C, H, W).

    Same arguments as ``torch.nn.LazyBatchNorm2d`` and the feature options of
    :class:`bnlab.BatchNorm1d` (keyword only); becomes a ``bnlab.BatchNorm2d`` at its first call.
    """

    cls_to_become = BatchNorm2d
    _ranks = BatchNorm2d._ranks


class LazyBatchNorm3d(_LazyBatchNormMixin, nn.LazyBatchNorm3d):
    """:class:`bnlab.BatchNorm3d` whose num_features is inferred from the first input (N, C, D, H, W).

    Same arguments as ``torch.nn.LazyBatchNorm3d`` and the feature options of
    :class:`bnlab.BatchNorm1d` (keyword only); becomes a ``bnlab.BatchNorm3d`` at its first call.
    """

    cls_to_become = BatchNorm3d
    _ranks = BatchNorm3d._ranks
