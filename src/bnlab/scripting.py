"""bnlab's layers under ``torch.jit.script``: a clear refusal instead of an error from deep inside.

TorchScript compiles a module's Python source, and bnlab's layers are Python that it cannot take
(their forward calls compiled kernels): scripting a model with one failed with "Unknown type
annotation: 'int | None'" from somewhere in bnlab. torch.jit.script asks each module for a
replacement first (``__prepare_scriptable__``); bnlab's layers answer with a TypeError that says
what does work. They do not answer with an equivalent torch.nn layer: torch.jit.script writes
that replacement into the user's own model, which would then silently stop running bnlab.
"""

from __future__ import annotations

from torch import nn

__all__ = ["refuse_scripting"]


def _options(layer: nn.Module) -> list[str]:
    """The layer's settings that torch.nn's BatchNorm layers cannot express."""
    options = []
    if getattr(layer, "virtual_batch_size", None) is not None:
        options.append(f"virtual_batch_size={layer.virtual_batch_size}")
    if getattr(layer, "renorm", False):
        options.append("renorm=True")
    if getattr(layer, "accumulation_steps", 1) != 1:
        options.append(f"accumulation_steps={layer.accumulation_steps}")
    if hasattr(layer, "activation"):  # BatchNormAct2d
        options.append(f"activation={layer.activation!r}, residual={layer.residual}")
    return options


def refuse_scripting(layer: nn.Module) -> None:
    """Raises the TypeError torch.jit.script reports for ``layer``: what to use instead."""
    name = type(layer).__name__
    ways = "torch.jit.trace (eval mode: torch's aten::batch_norm), torch.export or torch.compile take it"
    options = _options(layer)
    plain = not options and isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    convert = "; for a scripted copy with torch.nn's BN: torch.jit.script(bnlab.convert(copy.deepcopy(model), to='torch'))"
    raise TypeError(
        f"torch.jit.script: a bnlab {name}{' with ' + ', '.join(options) if options else ''} is not TorchScript; "
        f"{ways}{convert if plain else ''}"
    )
