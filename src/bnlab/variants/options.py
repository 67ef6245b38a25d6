"""Validation of the feature options of bnlab.BatchNorm1d/2d/3d (constructor arguments, not state).

Every option is a constructor argument and a plain attribute of the layer: none of them adds a
state-dict key, so state dicts stay interchangeable with torch.nn's. Defaults reproduce torch.nn.
"""

from __future__ import annotations

from bnlab.variants.accumulate import check_accumulation_steps
from bnlab.variants.ghost import check_virtual_batch_size
from bnlab.variants.renorm import check_renorm_options

__all__ = ["FEATURE_DEFAULTS", "check_feature_options"]

#: option name -> default; the defaults give torch.nn's behaviour (plus the non-finite guard).
FEATURE_DEFAULTS = {
    "virtual_batch_size": None,
    "renorm": False,
    "rmax": 3.0,
    "dmax": 5.0,
    "renorm_ramp": None,
    "accumulation_steps": 1,
    "skip_nonfinite": True,
}


def check_feature_options(
    *,
    virtual_batch_size: object,
    renorm: object,
    rmax: object,
    dmax: object,
    renorm_ramp: object,
    accumulation_steps: object,
    skip_nonfinite: object,
    track_running_stats: bool,
) -> dict:
    """Check the options together; return them normalised (ints, floats, tuples) as a dict.

    Raises TypeError/ValueError naming the argument; Batch Renormalization needs running
    statistics to correct towards, so ``renorm=True`` requires ``track_running_stats=True``.
    """
    for name, value in (("renorm", renorm), ("skip_nonfinite", skip_nonfinite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    rmax, dmax, renorm_ramp = check_renorm_options(rmax, dmax, renorm_ramp)
    if not renorm:  # they would be kept, and do nothing, and the layer's repr would not show them
        for name, value in (("rmax", rmax), ("dmax", dmax), ("renorm_ramp", renorm_ramp)):
            if value != FEATURE_DEFAULTS[name]:
                raise ValueError(f"{name}: an option of Batch Renormalization, used only with renorm=True; got "
                                 f"{name}={value!r} with renorm=False (pass renorm=True, or leave {name} out)")
    if renorm and not track_running_stats:
        raise ValueError(
            "renorm: Batch Renormalization corrects batch statistics towards the running ones, so it needs "
            "track_running_stats=True, got renorm=True with track_running_stats=False"
        )
    return {
        "virtual_batch_size": check_virtual_batch_size(virtual_batch_size),
        "renorm": renorm,
        "rmax": rmax,
        "dmax": dmax,
        "renorm_ramp": renorm_ramp,
        "accumulation_steps": check_accumulation_steps(accumulation_steps),
        "skip_nonfinite": skip_nonfinite,
    }
