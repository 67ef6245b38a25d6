"""A lean forward for bnlab's BatchNorm modules in the common case.

On small inputs (the lab's (256, 100) MLP activations) a BN call costs more in Python than in
arithmetic: the module's checks, then functional.batch_norm's checks of the same tensors, then
the autograd bookkeeping. ``module_forward`` validates the call once, cheaply, and hands it to
the backend's whole-call hooks (``train_forward`` / ``eval_forward``). Whenever anything is
unusual (a wrong shape or dtype, a parameter on another device, an empty batch, eval with
batch statistics, a gradient wanted in eval) it returns None *before changing any state*, and
the module takes the general path, which raises the usual errors. The results are the same
either way: the hooks run the same kernels as the general path.

A CPU call goes further: one compiled function (``bn_eval_module``, backends/cpu_kernels_py_eval.inc,
in eval mode; ``bn_train_module``, cpu_kernels_py_train.inc, in training mode) does the checks,
the allocations and the kernel call with the C API, and declines to the Python path below
anything it does not take.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from bnlab import _checks, backends, custom_ops
from bnlab.backends import cpu_eval_entry, cpu_train_entry, registered_cpu_backend, select_backend
from bnlab.backends.cpu import COMPILED_CALLS
from bnlab.composite import transforms_active
from bnlab.functional import eval_with_graph

_FLOATING = frozenset(_checks.FLOATING_DTYPES)
_jit_tracing = getattr(torch._C, "_is_tracing", lambda: False)


@contextlib.contextmanager
def python_path_only():
    """Within the block, calls skip the compiled whole calls (``bn_eval_module``, ``bn_train_module``,
    ``bn_backward_module`` for backward passes run inside the block) and take the Python path that
    runs when they decline: for A/B comparisons of the two
    (benchmarks/eval_paths.py, benchmarks/train_paths.py, tests). Not thread-local."""
    before = COMPILED_CALLS["on"]
    COMPILED_CALLS["on"] = False
    try:
        yield
    finally:
        COMPILED_CALLS["on"] = before


#: ``modules._BatchNormMixin.__call__``'s first try: ``LAYER_CALL["call"](layer, x)`` is ``layer(x)``;
#: or None, to go through nn.Module.__call__; or NotImplemented, to call forward directly (all that
#: nn.Module.__call__ would do). The slot itself None when there is no such call. Filled by
#: :func:`install_layer_call`.
LAYER_CALL: dict = {"call": None}


def install_layer_call(plain_forward) -> None:
    """Put in LAYER_CALL a stand-in that, on its first call with a CPU backend registered, puts the
    backend's compiled layer call for layers whose forward is ``plain_forward`` in its place
    (:meth:`CpuBackend.layer_call`, None without the extension module), and makes the call.

    The compiled call checks on every call, itself, that the CPU backend is the one chosen
    (``set_backend``, ``register_backend``), so the slot never needs refilling."""

    def first_call(layer, x):
        backend = registered_cpu_backend()
        if backend is None:
            return None  # asked again at the next call: a CPU backend may be registered by then
        call = LAYER_CALL["call"] = backend.layer_call(plain_forward, backends, (device_eval, device_train))
        return call(layer, x) if call is not None else None

    LAYER_CALL["call"] = first_call


def _plain(v: Tensor | None, channels: int, device: torch.device) -> bool:
    """None, or a floating (C,) tensor on ``device``: what functional.batch_norm would accept."""
    return v is None or (v.dtype in _FLOATING and v.shape == (channels,) and v.device == device)


def _option(module, name: str, default):
    """A plain attribute of the layer, or its class default, or ``default``.

    Not ``getattr(module, name, default)``: for a name the layer lacks, nn.Module.__getattr__
    builds and raises an AttributeError, which costs microseconds on every call.
    """
    found = module.__dict__.get(name, _MISSING)
    return found if found is not _MISSING else getattr(type(module), name, default)


_MISSING = object()

#: The slots the fast path reads from ``_parameters`` and ``_buffers`` (a slot holds None where
#: torch.nn registers it so: affine=False, track_running_stats=False). When one is absent,
#: torch.nn.utils.prune or torch.nn.utils.parametrize has moved it out and serves the tensor the
#: layer must use as an attribute or a property, which only the general path reads (as the
#: compiled whole calls decline, cpu_kernels_py_eval.inc ``registered``).
_REGISTERED_PARAMETERS = frozenset({"weight", "bias"})
_REGISTERED_BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def _plain_options(module) -> bool:
    """Plain BN: none of the feature options of docs/features.md that change the computation is on
    (read with their defaults, so the check also holds for layers built before the options existed)."""
    return (
        _option(module, "virtual_batch_size", None) is None
        and not _option(module, "renorm", False)
        and _option(module, "accumulation_steps", 1) == 1
    )


def module_forward(module, x: object) -> Tensor | None:
    """The output of ``module(x)`` for a bnlab BatchNorm module, or None for the general path.

    Args:
        module: a bnlab BatchNorm1d/2d/3d (anything with _BatchNormMixin's attributes).
        x: the input as given by the caller (not yet validated).

    Returns:
        The normalized tensor, with running statistics and num_batches_tracked updated exactly as
        the general path would; or None, with nothing changed.
    """
    compiling = custom_ops.tracing(x)
    # The compiled call reads functorch's and forward AD's state itself, not torch.jit.trace's. (The
    # bare C query, half the cost of torch.jit.is_tracing, is reached only outside torch.compile,
    # whose tracer cannot trace it.)
    if COMPILED_CALLS["on"] and not compiling and not _jit_tracing() and isinstance(x, Tensor) and x.is_cpu:
        # A CPU call in one compiled step, which declines anything but the plain case (then the
        # checks below run). In a network this runs right after a kernel that streamed megabytes
        # through the caches, where each Python step and tensor query costs microseconds
        # (docs/benchmark_rounds.md, eighth session); on small inputs the Python is most
        # of a training call (*A training call in one compiled step*).
        entry = cpu_train_entry() if module.training else cpu_eval_entry()
        if entry is not None:
            y = entry(module, x)
            if y is not None:
                return y
    if not isinstance(x, Tensor) or x.dtype not in _FLOATING or not _plain_options(module):
        return None
    if transforms_active():
        return None  # forward-mode AD or torch.func: the general path's differentiable torch ops
    shape = x.shape
    channels = module.num_features
    ranks = module._ranks  # empty for SyncBatchNorm (at world size 1 or in eval): any rank >= 2
    if (len(shape) not in ranks if ranks else len(shape) < 2) or shape[1] != channels:
        return None
    params, buffers = module._parameters, module._buffers
    if not (_REGISTERED_PARAMETERS <= params.keys() and _REGISTERED_BUFFERS <= buffers.keys()):
        return None  # pruned or parametrized (see _REGISTERED_PARAMETERS): the general path reads the attribute
    weight, bias = params["weight"], params["bias"]
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    device = x.device
    if not (
        _plain(weight, channels, device)
        and _plain(bias, channels, device)
        and _plain(running_mean, channels, device)
        and _plain(running_var, channels, device)
    ):
        return None
    eps, momentum = module.eps, module.momentum
    if type(eps) is not float or not eps > 0 or eps == math.inf:  # NaN fails eps > 0
        return None
    if not module.training:
        if compiling and running_mean is None and running_var is None and x.numel() > channels:
            # eval with batch statistics (track_running_stats=False), recorded nowhere
            return custom_ops.train(x, weight, bias, eps, None, None, None, None, False)
        if running_mean is None or running_var is None or x.numel() == 0:
            return None  # eval with batch statistics (track_running_stats=False), or an empty batch
        if compiling:  # traced by torch.compile / torch.export: one node of the graph (bnlab.custom_ops)
            return custom_ops.evaluate(x, running_mean, running_var, weight, bias, eps)
        graph = torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        )
        return device_eval(x, running_mean, running_var, weight, bias, eps, graph)
    if x.numel() <= channels:
        return None  # one value per channel is an error, zero an empty batch: the general path
    if momentum is not None and not (type(momentum) in (float, int) and _checks.is_finite_number(momentum)):
        return None
    nbt = None
    if not module.track_running_stats:
        running_mean = running_var = None
    elif (running_mean is None) != (running_var is None):
        return None
    else:
        nbt = buffers["num_batches_tracked"]
    if nbt is None and momentum is None:
        momentum = 0.0  # as _momentum_factor: no counter, no cumulative average
    guard = bool(_option(module, "skip_nonfinite", True))  # the non-finite guard, on by default
    if compiling:
        return custom_ops.train(x, weight, bias, eps, running_mean, running_var, nbt, momentum, guard)
    return device_train(x, weight, bias, eps, running_mean, running_var, momentum, nbt, guard)


# The last step of a validated call, shared by module_forward and the compiled layer call's route
# for calls the CPU kernels do not take (bn_device_call, backends/cpu_kernels_py_device.inc: a GPU
# tensor, or another backend chosen), which validates with the C API and calls these directly.
def device_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float, graph: bool) -> Tensor | None:  # fmt: skip
    """An eval call on the chosen backend, its arguments valid already: with an autograd graph when
    ``graph`` (grad mode on and x or a parameter requiring grad: frozen statistics while training,
    or inference outside no_grad), through BatchNormEvalFunction; else the backend's eval_forward
    (None: the general path runs, nothing changed)."""
    backend = select_backend(x)
    if graph:
        return eval_with_graph(x, running_mean, running_var, weight, bias, eps, backend)
    return backend.eval_forward(x, running_mean, running_var, weight, bias, eps)


def device_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, running_mean: Tensor | None,
                 running_var: Tensor | None, momentum, nbt: Tensor | None, guard: bool) -> Tensor | None:  # fmt: skip
    """A training call on the chosen backend, its arguments valid already (running statistics None
    when the layer keeps none, momentum 0.0 for None without a batch counter)."""
    # The backend counts the batch in num_batches_tracked itself (in its kernel call), or returns
    # None having changed nothing: then the module's general path runs. Its kernels would write
    # inference tensors outside inference mode, which the general path refuses as torch.nn does.
    if running_mean is not None and _checks.inference_buffers(running_mean, running_var, nbt):
        return None
    return select_backend(x).train_forward(x, weight, bias, eps, running_mean, running_var, momentum, nbt, guard)
