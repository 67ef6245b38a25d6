"""bnlab's layers as leaves of ``torch.fx.symbolic_trace``, as torch.nn's BatchNorm layers are.

torch.fx's default tracer records torch.nn's modules as single ``call_module`` nodes (leaves) and
traces through every other module's forward with Proxy objects in place of tensors. bnlab's
layers live outside torch.nn, so it traced into them, and their input checks rejected the Proxy:
``symbolic_trace`` failed on any model with a bnlab layer ("input: expected a torch.Tensor ...,
got Proxy"), and with it the FX-based tools (graph rewrites, shape propagation, FX quantization's
preparation). A layer that receives a Proxy now records itself as a ``call_module`` node, as the
tracer does for a leaf: the GraphModule then calls the layer itself, with all its options and
bnlab's bits, at run time.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_proxy", "record_call"]


def is_proxy(value: object) -> bool:
    """Whether ``value`` is torch.fx's stand-in for a tensor while symbolic_trace runs."""
    return isinstance(value, torch.fx.Proxy)


def record_call(layer: nn.Module, args: tuple, kwargs: dict) -> torch.fx.Proxy:
    """The ``call_module`` node for ``layer(*args, **kwargs)`` in the graph being traced (args[0] a Proxy).

    Raises:
        TypeError: the layer is the traced root itself, which a call_module node cannot name.
    """
    tracer = args[0].tracer
    name = tracer.path_of_module(layer)
    if not name:
        raise TypeError(
            f"torch.fx.symbolic_trace: a bnlab {type(layer).__name__} is recorded as one call_module node of "
            "the model holding it; trace that model (e.g. nn.Sequential(layer)), not the layer itself"
        )
    return tracer.create_proxy("call_module", name, args, kwargs)
