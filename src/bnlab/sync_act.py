"""``bnlab.SyncBatchNormAct2d``: BatchNormAct2d whose batch statistics span a torch.distributed group.

``SyncBatchNorm.convert_sync_batchnorm`` turns every ``bnlab.BatchNormAct2d`` of a model into one
of these, so that a ResNet built with the fused layer keeps its ReLU and its residual add when
it is synchronised (a plain SyncBatchNorm in its place would drop the ReLU and refuse the
residual). BN is bnlab.SyncBatchNorm's (its collectives, its running averages); the add and the
ReLU follow as in BatchNormAct2d off the Triton kernels (bnlab.fused.then_add_relu): the same
bits as SyncBatchNorm followed by torch's add and ReLU.
"""

from __future__ import annotations

from torch import Tensor

from bnlab import custom_ops
from bnlab.forward_handoff import forward_after_input_check
from bnlab.fused import ActLayerMixin, add_relu_ops, check_act_options, then_add_relu
from bnlab.fx_leaf import is_proxy, record_call
from bnlab.modules import _BatchNormMixin
from bnlab.sync import SyncBatchNorm

__all__ = ["SyncBatchNormAct2d"]


class SyncBatchNormAct2d(ActLayerMixin, SyncBatchNorm):
    """SyncBatchNorm over (N, C, H, W) followed by an optional residual add and ReLU:
    ``y = relu(SyncBN(x) + residual)``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
            bias: as bnlab.SyncBatchNorm.
        activation, residual: as bnlab.BatchNormAct2d.

    Shape: x and residual (N, C, H, W), N may differ between ranks; output the same. State dict:
    BatchNorm2d's, so it loads into and from BatchNormAct2d, BatchNorm2d and SyncBatchNorm.
    """

    #: its forward checks the input, then hands on (bnlab.forward_handoff)
    _asks_after_input_check = True

    _ranks = (4,)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, process_group=None,
                 device=None, dtype=None, *, bias=True, activation="relu", residual=False):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)  # fmt: skip
        self.activation, self.residual = check_act_options(activation, residual)

    # 4-D inputs only, as BatchNorm2d (SyncBatchNorm's own check takes any rank from 2)
    _check_input_dim = _BatchNormMixin._check_input_dim

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """relu(SyncBN(input) + residual); see the class docstring."""
        if is_proxy(input):  # torch.fx.symbolic_trace: one call_module node, as torch.nn's layers
            return record_call(self, (input,), {} if residual is None else {"residual": residual})
        x = self._checked_call(input, residual)
        z = forward_after_input_check(SyncBatchNormAct2d, self, x)  # SyncBatchNorm's, after the checks above
        relu = self.activation == "relu"
        if custom_ops.tracing(x):  # torch.compile / export: torch's ops, which the compiler fuses
            return add_relu_ops(z, residual, relu)
        return then_add_relu(z, x, residual, relu)
