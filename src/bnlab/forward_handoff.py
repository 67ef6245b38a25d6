"""How a layer whose forward checks its input and then hands on to the next forward along its MRO
keeps BN's forward from checking it again.

BatchNormAct2d, SyncBatchNorm and SyncBatchNormAct2d (the *askers*, ``_asks_after_input_check``)
run ``_check_input_dim`` and then hand the input on to the next forward, which for BN's own
forwards would run a subclass's check a second time (torch.nn runs it once per call). Each of BN's
forwards is marked with what it does after its check (:func:`mark_after_check`); when a class is
made, :func:`find_forwards_after_input_check` notes, for each asker along its MRO, the mark of the
next forward there (None for any other forward, a user's class overriding it), and
:func:`forward_after_input_check` then calls that, or the next forward itself. Found when the
class is made, so that torch.compile traces a class attribute, not the MRO (dynamo cannot trace a
bound method's ``__func__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["find_forwards_after_input_check", "forward_after_input_check", "mark_after_check"]


def mark_after_check(forward: Callable, after: Callable) -> None:
    """Mark ``forward`` (one of BN's forward functions) with ``after(layer, x)``: what it does once
    ``x`` has passed the layer's ``_check_input_dim``."""
    forward._after_input_check = after


def _attribute(asker: type) -> str:
    return "_after_input_check_" + asker.__name__


def find_forwards_after_input_check(cls: type) -> None:
    """For each asker along cls's MRO, the mark of the next forward after it there (a class
    attribute of cls, read by :func:`forward_after_input_check`), or None where that forward is
    not one of BN's."""
    mro = cls.__mro__
    for i, asker in enumerate(mro):
        if not asker.__dict__.get("_asks_after_input_check", False):
            continue
        following = next((k.__dict__["forward"] for k in mro[i + 1 :] if "forward" in k.__dict__), None)
        setattr(cls, _attribute(asker), getattr(following, "_after_input_check", None))


def forward_after_input_check(cls: type, layer: nn.Module, x: Tensor) -> Tensor:
    """``super(cls, layer).forward(x)`` for a tensor ``x`` (N, C, *) that ``layer._check_input_dim``
    has passed, ``cls`` the asker whose forward asks: where the next forward along the layer's MRO
    is one of BN's own, what it does after its check, so that a subclass's own check runs once per
    call; any other forward there is called as it is."""
    after = getattr(type(layer), _attribute(cls), None)
    return super(cls, layer).forward(x) if after is None else after(layer, x)
