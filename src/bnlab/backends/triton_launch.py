"""Launching bnlab's compiled Triton kernels again without JITFunction.run's per-call work.

On a GPU a BatchNorm call of a tensor of a few MB waits on the host, not on the memory: on an
H200 a training step at (32, 64, 56, 56) took 801 us of host time against torch.nn's 212, and a
profile put about a third of it in Triton's launch path (argument binding, cache-key hashing,
knob and hook look-ups, launch metadata), 5 launches a step (docs/benchmarks.md, *GPU (Triton)*).

:func:`launch` does the first launch of each specialization through Triton (``kernel[grid](...)``,
which compiles when needed and returns the compiled kernel) and remembers the compiled kernel
under a key of its own. Later launches with the same key call the compiled kernel's launcher
directly, with the same arguments Triton passes it. The key holds whatever Triton specializes
on (:func:`arg_key`): each tensor's dtype and whether its address is a multiple of 16 bytes, each
integer's width, whether it is 1 and whether it is a multiple of 16, the keyword arguments
(constexprs and compile options) by value, the kernel and the current device. So a launch the key
cannot tell apart from an earlier one runs the kernel Triton itself would have chosen
(tests/test_triton_launch.py checks the key against Triton's own specialization). The key is
computed by bnlab's compiled module where it has been built (``bn_launch_key``,
cpu_kernels_py_launch.inc: 1.0 us against 2.4 us in Python for a 10-argument launch on the
project's VM), else by :func:`python_launch_key`; the two tell the same launches apart.

Triton's path is taken instead on CPU tensors (the interpreter), when a launch hook is installed
(profilers such as proton see every launch), and with ``BNLAB_TRITON_DIRECT_LAUNCH=0`` in the
environment or :data:`ENABLED` set False. Options Triton reads from its knobs at each launch
(debug mode, instrumentation) are not in the key: set them before the first launch, or call
:func:`clear` after changing them.
"""

from __future__ import annotations

import os
import warnings

import torch

from bnlab.backends import cpu_build


def _enabled_by_environment() -> bool:
    """BNLAB_TRITON_DIRECT_LAUNCH: "0" off, "1" or unset on; anything else is named in a warning
    and leaves them on (this module loads with the Triton backend, which must not fail over it)."""
    value = os.environ.get("BNLAB_TRITON_DIRECT_LAUNCH", "1").strip()
    if value not in ("0", "1", ""):
        warnings.warn(f"BNLAB_TRITON_DIRECT_LAUNCH: expected 0 (off) or 1 (on), got {value!r}; "
                      "direct Triton launches stay on", RuntimeWarning, stacklevel=2)  # fmt: skip
    return value != "0"


#: Whether launches may bypass JITFunction.run (benchmarks/triton_host_time.py times both ways).
ENABLED = _enabled_by_environment()

_INT32 = 1 << 31
_UINT64 = 1 << 63


def arg_key(arg) -> object:
    """What Triton's specialization of one non-constexpr argument depends on (hashable).

    Tensors: dtype and 16-byte alignment; bools: only that they are bools; integers: 1 (Triton
    makes it a constant), else the width (32-bit, 64-bit, unsigned 64-bit) and divisibility by
    16; floats: only that they are floats; None: None.
    """
    if isinstance(arg, torch.Tensor):
        return arg.dtype, not arg.data_ptr() & 15
    if isinstance(arg, bool):  # before int: bool is an int subclass, specialized as u1
        return bool
    if isinstance(arg, int):
        return _int_key(arg)
    if isinstance(arg, float):
        return float
    if arg is None:
        return None
    return type(arg), arg  # anything else by value (hashable or not cached: see launch)


def _int_key(arg: int) -> object:
    if arg == 1:
        return 1
    width = 32 if -_INT32 <= arg < _INT32 else (64 if arg < _UINT64 else 65)
    return width, not arg & 15


def _key_of(args: tuple) -> list:
    """[arg_key(a) for a in args], with the common exact types (plain tensors, ints, floats)
    decided inline: a launch has 10-25 arguments, and this runs on every one of them."""
    out = []
    for arg in args:
        kind = type(arg)
        if kind is _TENSOR:
            out.append((arg.dtype, not arg.data_ptr() & 15))
        elif kind is int:
            out.append(_int_key(arg))
        elif kind is float:
            out.append(float)
        else:
            out.append(arg_key(arg))
    return out


_TENSOR = torch.Tensor


def python_launch_key(kernel, device: int, kwargs: dict, args: tuple) -> tuple:
    """The key of a launch: the kernel, the device, the keyword arguments by value, and what Triton
    specializes each positional argument on (:func:`_key_of`)."""
    return (id(kernel), device, tuple(kwargs.items()), *_key_of(args))


def _compiled_launch_key():
    """The extension module's ``bn_launch_key`` (cpu_kernels_py_launch.inc: the same distinctions
    as :func:`python_launch_key` in one C call, about 2 us less per launch), or None where bnlab's
    compiled module is unavailable (no compiler, the ctypes build, BNLAB_CPU_KERNELS=0)."""
    try:
        lib = cpu_build.load()  # loaded already (see _first_launch_key)
        key, setup = getattr(lib, "bn_launch_key", None), getattr(lib, "bn_launch_setup", None)
        if key is None or setup is None:
            return None
        setup(torch.Tensor)
        return key
    except Exception:  # any failure: the Python key, which tells the same launches apart
        return None


def _first_launch_key(kernel, device: int, kwargs: dict, args: tuple) -> tuple:
    """The key function's stand-in: the Python key until bnlab's compiled module has been loaded
    (on a GPU machine the layers' first call loads it), then the compiled key or the Python one for
    the rest of the process. It never builds the module itself: a GPU process that calls only
    bnlab.functional would otherwise wait for a CPU compile (about 25 s on the project's VM) in the
    middle of a launch. (Keys of the two forms never match: a specialization remembered under a
    Python key is launched through Triton once more and remembered again.)"""
    global _launch_key
    if not cpu_build.load_tried():
        return python_launch_key(kernel, device, kwargs, args)
    _launch_key = _compiled_launch_key() or python_launch_key
    return _launch_key(kernel, device, kwargs, args)


#: The key function of :func:`launch`, chosen at its first direct launch (see _first_launch_key).
_launch_key = _first_launch_key


#: key -> (compiled kernel, the constexpr values that follow the positional arguments)
_COMPILED: dict = {}
_COMPILED_KEPT = 4096


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher once Triton has
    launched the same specialization. Non-constexpr arguments positional, constexprs and compile
    options as keywords (as every bnlab launch passes them)."""
    if not (ENABLED and _on_gpu(args[0])) or _hooked():
        kernel[grid](*args, **kwargs)
        return
    device = _current_device()
    try:
        key = _launch_key(kernel, device, kwargs, args)
        found = _COMPILED.get(key)
    except TypeError:  # an unhashable argument: Triton's path every time
        kernel[grid](*args, **kwargs)
        return
    if found is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _constexpr_tail(kernel, len(args), kwargs)
        if compiled is not None and tail is not None and hasattr(compiled, "packed_metadata"):
            if len(_COMPILED) >= _COMPILED_KEPT:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tail)
        return
    compiled, tail = found
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    try:
        compiled.run(grid[0], g1, g2, _stream(device), compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)  # fmt: skip
    except TypeError as exc:  # a Triton whose launcher takes other arguments: refused before launching
        _give_up(exc)
        kernel[grid](*args, **kwargs)


def _give_up(exc: Exception) -> None:
    """Turn direct launches off for the process, saying why (a RuntimeWarning: gpu_check makes it an error)."""
    global ENABLED
    ENABLED = False
    _COMPILED.clear()
    warnings.warn(f"bnlab: direct Triton launches turned off, Triton's launch path used instead "
                  f"(this Triton's launcher refused bnlab's arguments: {exc})", RuntimeWarning, stacklevel=3)  # fmt: skip


def _constexpr_tail(kernel, n_positional: int, kwargs: dict) -> tuple | None:
    """The values of the kernel's parameters after the positional ones, in signature order (what
    Triton's launcher is handed after them), or None if one of them is not a constexpr passed by
    keyword or defaulted, or a positional one is a constexpr (its value would not be in the key)."""
    params = list(kernel.signature.parameters.values())
    constexprs = set(getattr(kernel, "constexprs", ()))
    if any(i in constexprs for i in range(n_positional)):
        return None
    tail = []
    for i, param in enumerate(params[n_positional:], start=n_positional):
        if i not in constexprs:
            return None
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.default is not param.empty:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _hooked() -> bool:
    """Whether a Triton launch hook is installed (Triton 3.6 and later keep hook chains; earlier
    ones a callable or None)."""
    runtime = _knobs_runtime()
    if runtime is None:
        return True  # a Triton without knobs: its own path
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _knobs_runtime():
    global _RUNTIME
    if _RUNTIME is _UNSET:
        try:
            from triton import knobs

            _RUNTIME = knobs.runtime
        except ImportError:
            _RUNTIME = None
    return _RUNTIME


_UNSET = object()
_RUNTIME = _UNSET


# The three look-ups a direct launch makes of the GPU (module functions, so that the tests can
# stand in for a GPU): Triton's own choices (its driver asks torch for the current device and its
# raw stream).
def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _current_device() -> int:
    return torch.cuda.current_device()


def _stream(device: int) -> int:
    return _RAW_STREAM(device)


def stream_of(t: torch.Tensor) -> tuple | None:
    """(t's device index, the current device, that device's current stream) for a GPU tensor: the
    stream Triton launches a kernel taking t on; None for other tensors (the interpreter's)."""
    if not _on_gpu(t):
        return None
    device = _current_device()
    return t.get_device(), device, _stream(device)


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _raw_stream_of_torch(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# torch's C accessor where this build has it (as Triton's driver does), else the public one
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", _raw_stream_of_torch)


def clear() -> None:
    """Forget every remembered compiled kernel (the next launch of each goes through Triton)."""
    _COMPILED.clear()
