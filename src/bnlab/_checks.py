"""Argument checks shared by every public entry point.

Each error names the argument, what was expected and what was given, so that a user can fix
the call without reading bnlab's source.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_num_features(num_features: object) -> int:
    """num_features must be a positive int (bool is rejected: True is not a channel count)."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(
            f"num_features: expected a positive int (the number of channels C), "
            f"got {type(num_features).__name__} {num_features!r}"
        )
    if num_features <= 0:
        raise ValueError(f"num_features: expected a positive int (the number of channels C), got {num_features}")
    return int(num_features)


def is_finite_number(v) -> bool:
    """Whether the real number v is finite: v - v == 0 is False for inf and NaN alike. Not
    math.isfinite, which torch.compile(dynamic=True) cannot trace on the symbolic float it makes
    of a layer's float attribute (eps, momentum)."""
    return v - v == 0


def check_eps(eps: object, *, allow_zero: bool = False) -> float:
    """eps must be a finite real number > 0 (>= 0 where ``allow_zero``: inference may use eps = 0)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a finite float > 0, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    bound = "a finite float >= 0" if allow_zero else "a finite float > 0"
    if not is_finite_number(eps) or eps < 0 or (eps == 0 and not allow_zero):
        raise ValueError(f"eps: expected {bound} (it keeps 1/sqrt(var + eps) finite), got {eps!r}")
    return eps


def check_momentum(momentum: object) -> float | None:
    """momentum is None (cumulative average) or a finite real number; PyTorch accepts any finite value."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum: expected a float (the weight of the new batch, usually in [0, 1]) or None, "
            f"got {type(momentum).__name__} {momentum!r}"
        )
    momentum = float(momentum)
    if not is_finite_number(momentum):
        raise ValueError(
            f"momentum: expected a finite float (the weight of the new batch, usually in [0, 1]) or None, "
            f"got {momentum!r}"
        )
    return momentum


def check_input(x: object, name: str = "input") -> Tensor:
    """x must be a floating-point tensor of rank >= 2 with channels on axis 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (N, C, *), got {type(x).__name__}")
    if x.dtype not in FLOATING_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a tensor of shape (N, C, *) with rank >= 2, got shape {tuple(x.shape)}")
    return x


def check_input_rank(x: Tensor, allowed: tuple[int, ...], layer: str) -> None:
    """The rank a layer class accepts, e.g. BatchNorm2d takes (N, C, H, W) only."""
    if x.dim() not in allowed:
        shapes = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
        expected = " or ".join(f"{r}D {shapes[r]}" for r in allowed)
        raise ValueError(f"input: {layer} expected {expected} input, got {x.dim()}D input of shape {tuple(x.shape)}")


def check_input_channels(x: Tensor, num_features: int) -> None:
    """The input's dim 1 holds the layer's ``num_features`` channels (x of rank >= 2)."""
    if x.shape[1] != num_features:
        raise ValueError(
            f"input: expected {num_features} channels on dim 1 (num_features={num_features}), "
            f"got input of shape {tuple(x.shape)} with {x.shape[1]}"
        )


def check_channel_vector(v: Tensor | None, name: str, channels: int, x: Tensor) -> None:
    """weight, bias, running_mean and running_var must be floating (C,) tensors on x's device."""
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({channels},) or None, got {type(v).__name__}")
    if v.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {v.dtype}")
    if v.dim() != 1 or v.numel() != channels:
        raise ValueError(
            f"{name}: expected shape ({channels},) to match input channels (input.shape[1] = {channels}), "
            f"got shape {tuple(v.shape)}"
        )
    if v.device != x.device:
        raise ValueError(f"{name}: expected a tensor on the input's device {x.device}, got one on {v.device}")


def values_per_channel(x: Tensor) -> int:
    """m = N · prod(spatial): how many values each channel's statistics are computed from."""
    count = x.shape[0]
    for size in x.shape[2:]:
        count *= size
    return count


def check_training_batch(x: Tensor) -> None:
    """Training needs more than one value per channel: with one, x - mean is 0 and every gradient vanishes."""
    if values_per_channel(x) == 1:
        raise ValueError(
            f"input: expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
            f"(batch statistics of a single value are degenerate; use eval mode or a larger batch)"
        )


def check_running_var_nonnegative(running_var: Tensor) -> None:
    """A negative running variance makes sqrt(var + eps) NaN; PyTorch returns NaN silently, bnlab refuses.

    On CUDA this is an asynchronous device-side assertion, so that eval mode never waits for the GPU.
    """
    if running_var.device.type == "cpu":
        # the values under torch.func's wrappers: vmap's batched tensor cannot decide a Python `if`
        # (an ensemble of layers in eval under vmap raised), its whole (B, C) stack can; each vmap
        # level's batch dimension is moved to the front, so that the channels stay last
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(running_var):
            batch_dim = functorch.maybe_get_bdim(running_var) if functorch.is_batchedtensor(running_var) else None
            running_var = functorch.get_unwrapped(running_var)
            if batch_dim is not None:
                running_var = running_var.movedim(batch_dim, 0)
        if bool((running_var < 0).any()):
            bad = torch.nonzero((running_var < 0).reshape(-1, running_var.shape[-1]).any(0)).flatten().tolist()[:8]
            raise ValueError(
                f"running_var: expected non-negative values (variances), got negative entries at channels {bad}; "
                f"the buffer was corrupted, e.g. by a bad checkpoint or an in-place edit"
            )
    elif running_var.device.type == "cuda":
        torch._assert_async(~(running_var < 0).any(), "running_var: expected non-negative values, got negative entries")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def inference_buffers(running_mean: Tensor | None, running_var: Tensor | None,
                      num_batches_tracked: Tensor | None) -> list[str]:  # fmt: skip
    """The names of a layer's running buffers (None where it has none) that are inference tensors
    (made under torch.inference_mode()) while that mode is off now, where torch refuses to update a
    tensor in place; [] under torch.compile's tracing, whose tensors stand for the real ones."""
    if _is_compiling() or torch.is_inference_mode_enabled():  # (in this order: dynamo cannot trace the second)
        return []
    buffers = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": num_batches_tracked}
    return [name for name, t in buffers.items() if t is not None and t.is_inference()]


def check_buffers_updatable(running_mean: Tensor | None, running_var: Tensor | None,
                            num_batches_tracked: Tensor | None) -> None:  # fmt: skip
    """A training call's running buffers must be updatable in place: not inference tensors outside
    torch.inference_mode() (a layer built inside it, then trained outside), which torch.nn refuses
    in its ``num_batches_tracked.add_(1)``. Raised before any state moves."""
    frozen = inference_buffers(running_mean, running_var, num_batches_tracked)
    if frozen:
        raise RuntimeError(
            "Inplace update to inference tensor outside InferenceMode is not allowed: the layer's "
            f"{', '.join(frozen)} were made under torch.inference_mode() (inference tensors), and a training "
            "call updates them in place; call the layer inside torch.inference_mode(), or give it normal "
            f"tensors first, outside it (e.g. layer.{frozen[0]} = layer.{frozen[0]}.clone())"
        )


_is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", lambda t: False)


def check_vmapped_update(running_mean: Tensor | None, running_var: Tensor | None, batch_mean: Tensor) -> None:
    """Under torch.func.vmap, the statistics of a batched input cannot go into running statistics
    that are not batched (an in-place update of an unbatched tensor): said in terms of BN, as
    torch.nn's layers say it, where vmap's own message spoke of in-place arithmetic."""
    if running_mean is None or _is_compiling() or not _is_batched(batch_mean):  # (dynamo traces no functorch query)
        return
    unbatched = [name for name, t in (("running_mean", running_mean), ("running_var", running_var))
                 if t is not None and not _is_batched(t)]  # fmt: skip
    if unbatched:
        raise RuntimeError(
            f"{', '.join(unbatched)}: a training call under torch.func.vmap got an input batched by vmap, while the "
            "layer's running statistics, which the call updates in place, are not batched. Set "
            "track_running_stats=False if the layer needs no eval mode (torch.func.replace_all_batch_norm_modules_"
            "(model) does so for a whole model), give it batched buffers (torch.func.stack_module_state and "
            "functional_call), or call it in eval mode"
        )
