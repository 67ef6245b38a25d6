"""Compile bnlab's CPU kernels (cpu_kernels.cpp) at first use, cache the library, load it with ctypes.

Why this way (measurements in docs/benchmarks.md): a plain C++ file with OpenMP and no torch
headers compiles in a few seconds with the system's g++ and needs no package beyond numpy and
torch. It is built as a CPython extension module when Python.h is available (argument conversion
~20 ns each), else as a plain shared library loaded through ctypes (~250 ns each; the same
functions, called the same way). The best build, "torch", is that extension module with one more
file, cpu_kernels_torch.cpp, compiled against the installed torch's C++ headers, through which the
compiled layer calls read their tensors and make their outputs (2-3 us less a call); where that
file does not compile (no headers, an older compiler), or with ``BNLAB_TORCH_API=0``, the plain
extension module is built instead. The library is cached under
``$BNLAB_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bnlab`` or ``~/.cache/bnlab``), keyed by a hash
of the sources, the compiler, the flags and the CPU's instruction set, so it is built once per
machine and rebuilt when any of these change. It is written to a temporary name and renamed into
place, so concurrent first uses (several test workers, torchrun ranks) never load half a file.

Without a working compiler, or with ``BNLAB_CPU_KERNELS=0``, :func:`load` returns None and records
why; bnlab then runs the portable backend, which gives the same results, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path

from bnlab.backends import cpu_build_torch as torch_build
from bnlab.backends.cpu_compile import BASE_FLAGS, MAIN_SOURCE, compile_library
from bnlab.backends.cpu_environment import check_environment

__all__ = ["load", "load_error", "library_path", "build_seconds"]

_HERE = Path(__file__).resolve().parent
SOURCES = (
    MAIN_SOURCE,
    "cpu_kernels_types.inc",
    "cpu_kernels_avx512.inc",
    "cpu_kernels_stores.inc",
    "cpu_kernels_stats.inc",
    "cpu_kernels_layout.inc",
    "cpu_kernels_threads.inc",
    "cpu_kernels_sums.inc",
    "cpu_kernels_ncl.inc",
    "cpu_kernels_ncl_chunk_grad.inc",
    "cpu_kernels_grad_shifts.inc",
    "cpu_kernels_grad_coef.inc",
    "cpu_kernels_stream_bounds.inc",
    "cpu_kernels_ncl_tails.inc",
    "cpu_kernels_coef.inc",
    "cpu_kernels_eval_cache.inc",
    "cpu_kernels_ncl_lines.inc",
    "cpu_kernels_ncl_channels.inc",
    "cpu_kernels_ncl_by_sample.inc",
    "cpu_kernels_ncl_passes.inc",
    "cpu_kernels_ncl_flat.inc",
    "cpu_kernels_ncl_groups.inc",
    "cpu_kernels_waves.inc",
    "cpu_kernels_nlc_half.inc",
    "cpu_kernels_nlc_short.inc",
    "cpu_kernels_nlc_rows.inc",
    "cpu_kernels_nlc_row_forms.inc",
    "cpu_kernels_nlc_affine_rows.inc",
    "cpu_kernels_nlc_grad_groups.inc",
    "cpu_kernels_nlc_grad_rows.inc",
    "cpu_kernels_nlc_tree.inc",
    "cpu_kernels_nlc.inc",
    "cpu_kernels_nlc_choices.inc",
    "cpu_kernels_nlc_forward.inc",
    "cpu_kernels_nlc_backward.inc",
    "cpu_kernels_nlc_passes.inc",
    "cpu_kernels_dispatch.inc",
    "cpu_kernels_own_coef.inc",
    "cpu_kernels_fixups.inc",
    "cpu_kernels_api.inc",
    "cpu_kernels_relu.inc",
    "cpu_kernels_parts.inc",
    "cpu_kernels_py.inc",
    "cpu_kernels_py_tensors.inc",
    "cpu_kernels_py_attrs.inc",
    "cpu_kernels_py_eval.inc",
    "cpu_kernels_py_train.inc",
    "cpu_kernels_py_backward.inc",
    "cpu_kernels_py_device.inc",
    "cpu_kernels_py_call.inc",
    "cpu_kernels_py_launch.inc",
    "cpu_kernels_pool.inc",
    "cpu_kernels_torch.h",
    "cpu_kernels_torch.cpp",
)
TORCH_API = torch_build.API

_lock = threading.Lock()
_state: dict = {
    "lib": None, "error": None, "tried": False, "path": None, "seconds": None, "variant": None, "skipped": []
}


def cache_dir() -> Path:
    """Where compiled kernels are kept: $BNLAB_CACHE_DIR, else $XDG_CACHE_HOME/bnlab, else ~/.cache/bnlab."""
    explicit = os.environ.get("BNLAB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bnlab"


def _compiler() -> str | None:
    """$CXX if set, else the first of g++, c++, clang++ on PATH."""
    explicit = os.environ.get("CXX")
    if explicit:
        return explicit
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags: a library built with -march=native must not move to another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_identity(cxx: str) -> str:
    """The compiler's resolved path, size and modification time: changes when it is upgraded."""
    path = shutil.which(cxx) or cxx
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return path


def _key(cxx: str, variant: list[str]) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((_HERE / name).read_bytes())
    flags = " ".join(BASE_FLAGS + variant)
    parts = (_compiler_identity(cxx), flags, _cpu_signature(), platform.platform(), sys.version)
    if TORCH_API in variant:  # the torch build is bound to the torch it was compiled against
        parts += torch_build.identity()
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()[:16]


def _python_include() -> str | None:
    """Directory holding Python.h, or None (then only the ctypes library can be built)."""
    include = sysconfig.get_paths().get("include")
    return include if include and (Path(include) / "Python.h").exists() else None


def _variants() -> list[tuple[str, list[str]]]:
    """(kind, flags) to try, best first: the torch build of the extension module, the plain
    extension module, then ctypes libraries."""
    out = []
    include = _python_include()
    if include is not None:
        module = ["-march=native", "-fopenmp", "-DBNLAB_PYTHON_MODULE", f"-I{include}"]
        torch_flags = torch_build.compile_flags()
        if torch_flags:
            out.append(("torch", module + torch_flags))
        out.append(("module", module))
    out += [("ctypes", ["-march=native", "-fopenmp"]), ("ctypes", ["-fopenmp"]), ("ctypes", [])]
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of the entry points (cpu_kernels_api.inc), so that ctypes converts Python ints."""
    P, I, L, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    sigs = {
        "bn_forward_train": [P, P, I, I, L, L, L, P, I, P, I, D, P, P, I, P, I, D, P, I, I, I, L],
        "bn_backward": [P, P, P, I, I, L, L, L, P, P, P, I, D, P, P, I, P, I, I, L, I],
        "bn_normalize": [P, P, I, I, L, L, L, P, P, P, I, P, I, I],
        "bn_eval": [P, P, I, I, L, L, L, P, I, P, I, P, I, P, I, D, I],
        "bn_grad_input": [P, P, P, I, I, L, L, L, P, P, P, I, P, P, D, I],
        "bn_eval_stats": [P, I, P, I, D, P, L],
        "bn_eval_backward": [P, P, P, I, I, L, L, L, P, P, P, I, P, I, P, I, I, L],
        "bn_relu": [P, I, L, I],
        "bn_relu_backward": [P, P, P, I, L, I],
        "bn_add_relu": [P, P, I, L, I, I],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def _load_module(path: Path):
    """Import the extension module at path (its init function is PyInit__bnlab_cpu)."""
    spec = importlib.util.spec_from_file_location("_bnlab_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load():
    """The kernels (extension module or ctypes library), compiled on first use; None if unavailable.

    Thread-safe; tries once per process. :func:`load_error` tells why it is None. Raises
    ValueError (on every call, until it is fixed) when a byte-count variable of the environment
    is malformed (:func:`check_environment`).
    """
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        check_environment()
        try:
            _state["lib"] = _build_and_load()
        except Exception as exc:  # any failure means "use the portable backend", never a crash
            _state["error"] = f"{type(exc).__name__}: {exc}"
        _state["tried"] = True
    return _state["lib"]


def _build_and_load():
    if os.environ.get("BNLAB_CPU_KERNELS", "1") == "0":
        _state["error"] = "disabled by BNLAB_CPU_KERNELS=0"
        return None
    cxx = _compiler()
    if cxx is None:
        _state["error"] = "no C++ compiler found (set CXX, or install g++)"
        return None
    import torch  # noqa: F401  (loaded first, so the library binds to torch's OpenMP runtime)

    errors = []
    for kind, flags in _variants():
        target = cache_dir() / f"bnlab_cpu_{kind}_{_key(cxx, flags)}.so"
        if not target.exists():
            _say(f"compiling its CPU kernels for this machine, once ({kind} build, up to half a minute), "
                 f"into {target.parent} ...")  # fmt: skip
            start = time.perf_counter()
            err = compile_library(cxx, flags, target)
            if err is not None:
                _say(f"that build failed after {time.perf_counter() - start:.1f} s")
                errors.append(err)
                continue
            _state["seconds"] = time.perf_counter() - start
            _say(f"CPU kernels compiled in {_state['seconds']:.1f} s")
        try:
            lib = _load_module(target) if kind in ("torch", "module") else _declare(ctypes.CDLL(str(target)))
        except (OSError, ImportError) as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        _state["path"] = str(target)
        _state["variant"] = (kind, flags)
        _state["skipped"] = errors  # why the variants before this one did not build or load
        return lib
    _state["error"] = "\n".join(errors)
    _say("no build of the CPU kernels worked: the portable backend runs instead, slower "
         "(bnlab.backends.cpu_build.load_error() says why)")  # fmt: skip
    return None


def _say(message: str) -> None:
    """One line on stderr while the kernels compile: the first BatchNorm call of a new machine or
    version waits up to half a minute for it, and would otherwise look hung (the lab's progress bars
    and a script's own output go on after it)."""
    print(f"bnlab: {message}", file=sys.stderr, flush=True)


def load_tried() -> bool:
    """Whether :func:`load` has run in this process (then it returns at once): for callers that use
    the kernels only once something else has loaded them, and must not start a compile."""
    return _state["tried"]


def load_error() -> str | None:
    """Why :func:`load` returned None (None if it succeeded or was not tried)."""
    return _state["error"]


def library_path() -> str | None:
    """Path of the loaded library, for diagnostics."""
    return _state["path"]


#: The vector extensions the kernels have forms for (cpu_kernels*.inc), in the order status() names them.
_VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16")


def _vector_extensions() -> str:
    """Which of _VECTOR_FLAGS this CPU reports (what a -march=native build can use), or "none"."""
    flags = set(_cpu_signature().split(":", 1)[-1].split())
    found = [f for f in _VECTOR_FLAGS if f in flags]
    return " ".join(found) if found else "none"


def status() -> str:
    """What :func:`load` gave, in words, for diagnostics (``bnlab selfcheck`` prints it): the kind of
    library and its flags, its path, the compile time if this process compiled it, and why any
    better variant was not used (the first line of its error); or why there are no kernels."""
    lib = load()
    if lib is None:
        return f"compiled CPU kernels unavailable ({load_error()}); the portable backend runs on the CPU"
    kind, flags = _state["variant"]
    what = {
        "torch": "extension module on torch's C++ API",
        "module": "extension module on the Python C API (the torch build failed, is off, or torch has no headers)",
    }.get(kind, "ctypes library (no compiled whole calls)")
    arch = next((f for f in flags if f.startswith("-march=")), "no -march (generic x86-64)")
    if arch == "-march=native":
        arch += f" (this CPU's vector extensions: {_vector_extensions()})"
    text = f"compiled CPU kernels: {what}, {arch}, {_state['path']}"
    if _state["seconds"] is not None:
        text += f", compiled in {_state['seconds']:.1f} s by this process"
    for err in _state["skipped"]:
        lines = [ln for ln in err.splitlines() if "error" in ln.lower()] or err.splitlines()
        text += f"\n  a better variant did not build: {lines[0].strip() if lines else err}"
    return text


def build_seconds() -> float | None:
    """How long this process spent compiling the library (None if it came from the cache)."""
    return _state["seconds"]
