"""Setting up the extension module's whole calls: the Python objects each C entry point reads.

The compiled module's ``bn_eval_module`` (cpu_kernels_py_eval.inc), ``bn_train_module``
(cpu_kernels_py_train.inc) and ``bn_layer_call`` (cpu_kernels_py_call.inc) read torch's types,
dtypes and functions, bnlab's switches and the backend registry through references handed over
once, here, instead of importing Python modules from C. Each ``*_setup`` call's argument list is
documented beside the entry point. :class:`bnlab.backends.cpu.CpuBackend` calls these once and
keeps what they return.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.modules.module as torch_module
from torch import Tensor

from bnlab import composite
from bnlab.backends import cpu_pool
from bnlab.backends.autograd_apply import _COMPILING
from bnlab.backends.cpu_autograd import eval_done_apply, kernel_done_apply


def setup_whole_calls(lib, backend, codes, parallel_min_numel: int, wave_per_thread: int,
                      narrow: tuple[int, int]) -> tuple:
    """(bn_eval_module, bn_train_module) set up on ``lib``, each None where it cannot be.

    Args:
        lib: the loaded kernels (None without them; the ctypes build has no entry points).
        backend: the CpuBackend, which the training call's autograd Function calls back.
        codes: torch's four floating dtypes in the kernels' code order.
        parallel_min_numel, wave_per_thread: cpu.PARALLEL_MIN_NUMEL and cpu.WAVE_PER_THREAD.
        narrow: (cpu.NARROW_ROWS, cpu.NARROW_CHANNEL_VALUES): training calls of the narrow walks
            count their channels towards parallel_min_numel (cpu.threads_for).
    """
    entry = getattr(lib, "bn_eval_module", None) if lib is not None else None
    if entry is None:
        return None, None
    lib.bn_eval_setup(
        Tensor, torch.nn.Parameter, tuple(codes), cpu_pool.from_capsule, torch.empty_like,
        torch.is_grad_enabled, torch.get_num_threads, cpu_pool.pool_state(), cpu_pool.POOL_MIN_BYTES,
        parallel_min_numel, composite.functorch_active, torch.autograd.forward_ad, torch.nn.Module,
    )  # fmt: skip
    if kernel_done_apply is None or eval_done_apply is None:
        # Without torch's C apply neither Function can be made here: the training call then stays
        # on the Python path, and an eval call wanting a graph too.
        return entry, None
    lib.bn_train_setup(
        kernel_done_apply, eval_done_apply, backend, torch.empty, torch.float64, torch.int64,
        _COMPILING or (lambda: False), torch.autograd.graph.increment_version, torch.is_inference_mode_enabled,
        wave_per_thread, *narrow,
    )  # fmt: skip
    return entry, lib.bn_train_module


def _torch_module_calls() -> tuple:
    """(nn.Module.__call__, nn.Module._call_impl) as torch defines them, read when bnlab is imported;
    (None, None) when either is already something else (a tool that patched it before bnlab was
    imported): the compiled layer call then never takes a call, and every call goes through
    nn.Module.__call__ as patched.

    The compiled layer call compares the class's current two with these on every call, and leaves a
    call to nn.Module.__call__ when they differ (torch.fx patches __call__ while it traces, profilers
    may patch either). Read at import, not at the first layer call, so that a patch made in between
    is not taken for torch's own; checked by where their code was written (a wrapper made with
    functools.wraps copies the name, not the code)."""
    own_file = os.path.normcase(os.path.abspath(torch_module.__file__))
    found = tuple(torch.nn.Module.__dict__.get(name) for name in ("__call__", "_call_impl"))
    for function in found:
        if not isinstance(function, types.FunctionType):
            return None, None
        if os.path.normcase(os.path.abspath(function.__code__.co_filename)) != own_file:
            return None, None
    return found


#: nn.Module's own __call__ and _call_impl (see :func:`_torch_module_calls`).
TORCH_MODULE_CALLS = _torch_module_calls()


def setup_layer_call(lib, backend, plain_forward, backends_module, compiled_calls: dict, device_calls=None):
    """bn_layer_call set up on ``lib`` (whose whole calls are set up already), or None without it.

    Args:
        backend: the CpuBackend whose being chosen (``backends_module``'s registry and pin,
            read on every call) lets the call run the compiled entries.
        plain_forward: modules._BatchNormMixin.forward (an overridden one declines).
        backends_module: bnlab.backends.
        compiled_calls: cpu.COMPILED_CALLS, the switch _fastpath.python_path_only turns off.
        device_calls: (_fastpath.device_eval, _fastpath.device_train), where plain calls that the
            CPU entries do not take go once validated (cpu_kernels_py_device.inc); None: those
            calls answer NotImplemented.
    """
    call = getattr(lib, "bn_layer_call", None) if lib is not None else None
    if call is not None:
        lib.bn_call_setup(
            compiled_calls, torch._C._get_tracing_state, torch.nn.Module, torch_module, plain_forward,
            backends_module, backend, *TORCH_MODULE_CALLS,
        )  # fmt: skip
        if device_calls is not None:
            lib.bn_device_setup(*device_calls)
    return call
