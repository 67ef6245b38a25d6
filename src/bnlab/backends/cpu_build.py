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
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from bnlab.backends import cpu_build_torch as torch_build
from bnlab.backends.cpu_environment import check_environment

__all__ = ["load", "load_error", "library_path", "build_seconds"]

_HERE = Path(__file__).resolve().parent
SOURCES = (
    "cpu_kernels.cpp",
    "cpu_kernels_sums.inc",
    "cpu_kernels_ncl.inc",
    "cpu_kernels_ncl_tails.inc",
    "cpu_kernels_coef.inc",
    "cpu_kernels_eval_cache.inc",
    "cpu_kernels_ncl_lines.inc",
    "cpu_kernels_ncl_channels.inc",
    "cpu_kernels_ncl_passes.inc",
    "cpu_kernels_ncl_flat.inc",
    "cpu_kernels_ncl_groups.inc",
    "cpu_kernels_waves.inc",
    "cpu_kernels_nlc_half.inc",
    "cpu_kernels_nlc_short.inc",
    "cpu_kernels_nlc_rows.inc",
    "cpu_kernels_nlc_tree.inc",
    "cpu_kernels_nlc.inc",
    "cpu_kernels_api.inc",
    "cpu_kernels_relu.inc",
    "cpu_kernels_parts.inc",
    "cpu_kernels_py.inc",
    "cpu_kernels_py_tensors.inc",
    "cpu_kernels_py_eval.inc",
    "cpu_kernels_py_train.inc",
    "cpu_kernels_py_device.inc",
    "cpu_kernels_py_call.inc",
    "cpu_kernels_py_launch.inc",
    "cpu_kernels_pool.inc",
    "cpu_kernels_torch.h",
    "cpu_kernels_torch.cpp",
)
TORCH_SOURCE, TORCH_API = torch_build.SOURCE, torch_build.API
# -fno-math-errno: std::sqrt sets no errno (nothing reads it), so loops of square roots vectorise;
# the results are the same correctly rounded values. -falign-loops=64: every loop starts on a cache
# line, so that a kernel's speed does not hang on where unrelated code moved it. Without it, an
# edit of the by-sample passes alone made the untouched channel-group forward of (64, 512, 3, 3)
# 1.11-1.17x slower; with it, the same edit changed nothing (docs/benchmark_rounds.md, seventh session).
_BASE_FLAGS = ["-O3", "-falign-loops=64", "-fno-math-errno", "-fPIC", "-shared", "-std=c++17"]

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
    parts = (_compiler_identity(cxx), " ".join(_BASE_FLAGS + variant), _cpu_signature(), platform.platform(), sys.version)
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


def _compile(cxx: str, flags: list[str], target: Path) -> str | None:
    """Compile to a temporary file next to target, then rename it into place. Returns an error or None.

    With two cores or more, in parts at once (:func:`_compile_parts`: 18.0 s against 26.8 s in one
    file on the project's 2-core Zen 3 VM, less with more cores; the same bits); in one file with
    one core, or when the parts do not build or link (the one file then says why, if it fails too).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if TORCH_API in flags:  # its extra file is a part of its own: parts only, even on one core
        return _compile_parts(cxx, flags, target)
    if _parallel_jobs() > 1 and _compile_parts(cxx, flags, target) is None:
        return None
    return _compile_whole(cxx, flags, target)


def _compile_whole(cxx: str, flags: list[str], target: Path) -> str | None:
    """The library from cpu_kernels.cpp in one compiler run (through a temporary file). Error or None."""
    return _run_to(target, [cxx, *_BASE_FLAGS, *flags, str(_HERE / SOURCES[0])])


#: the parts (cpu_kernels.cpp, *Parts*): each dtype's kernels (the dtype codes of cpu.py's _CODE),
#: the slowest first, then the main part (entry points and Python glue, a few seconds)
_PARTS = (("-DBNLAB_PART_DTYPE=0",), ("-DBNLAB_PART_DTYPE=2",), ("-DBNLAB_PART_DTYPE=1",), ("-DBNLAB_PART_DTYPE=3",),
          ("-DBNLAB_PART_MAIN",))  # fmt: skip


def _parallel_jobs() -> int:
    """Compiler processes to run at once: the cores this process may use, at most one per part."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, len(_PARTS)))


def _compile_parts(cxx: str, flags: list[str], target: Path) -> str | None:
    """The library from its parts: each compiled to an object at once (up to _parallel_jobs() at a
    time), then linked into target (through a temporary file). The torch build has one more part,
    cpu_kernels_torch.cpp in C++20 (as torch's headers need), compiled first (the slowest), and
    links torch's libraries. Returns an error or None; leaves no file behind either way."""
    compile_flags = [f for f in _BASE_FLAGS if f != "-shared"] + flags
    link_extra = []
    with tempfile.TemporaryDirectory(prefix=target.stem + ".parts.", dir=target.parent) as folder:
        objects = [str(Path(folder) / f"part{i}.o") for i in range(len(_PARTS))]
        commands = [[cxx, *compile_flags, *part, "-c", str(_HERE / SOURCES[0]), "-o", obj]
                    for part, obj in zip(_PARTS, objects)]  # fmt: skip
        if TORCH_API in flags:
            objects.insert(0, str(Path(folder) / "torch.o"))
            commands.insert(0, [cxx, *compile_flags, "-std=c++20", "-c", str(_HERE / TORCH_SOURCE), "-o", objects[0]])
            link_extra = torch_build.link_flags()
        errors = [err for err in _run_all(commands) if err is not None]
        if errors:
            return errors[0]
        return _run_to(target, [cxx, "-shared", *[f for f in flags if f == "-fopenmp"], *objects, *link_extra])


def _run_all(commands: list[list[str]]) -> list[str | None]:
    """Each command's error or None (:func:`_run`), up to _parallel_jobs() of them at a time.

    Interrupted (Ctrl-C reaches the main thread waiting here), the compilers running are killed and
    the commands not started are dropped before the interrupt goes on: the pool's own exit had run
    every queued part first, and Ctrl-C took about 23 s to act (the fifty-first session's audit)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, min(_parallel_jobs(), len(commands))))
    try:
        return list(pool.map(_run, commands))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        with _RUNNING_LOCK:
            _INTERRUPTED.set()  # a part between its turn and its start does not start (_run)
            for proc in _RUNNING:
                _kill(proc)
        raise
    finally:
        pool.shutdown(wait=True)  # the killed compilers' threads, at once
        _INTERRUPTED.clear()  # no part is left to stop: a later build (a retry, the link) runs


#: The compiler processes running now (:func:`_run`), which an interrupted build kills (:func:`_run_all`).
_RUNNING: set = set()
#: Each compiler in a process group of its own (Python 3.11+ on POSIX), which _kill ends whole: killed
#: alone, the g++ driver left cc1plus running (and holding the pipes, so the wait went on till it
#: ended). A group, not a session: Linux's autogroup shares the CPU between sessions first, and a
#: compile in a session of its own took as much CPU as the test suite however niced
#: (tests/background_checks.py). On Python 3.10, no group: the driver alone is killed.
_OWN_GROUP = {"process_group": 0} if os.name == "posix" and sys.version_info >= (3, 11) else {}
_RUNNING_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()


def _kill(proc: subprocess.Popen) -> None:
    """Ends a compiler that _run started, with the processes it started (its process group)."""
    try:
        if _OWN_GROUP:
            os.killpg(proc.pid, 9)  # SIGKILL (signal.SIGKILL is absent on Windows)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass  # ended already


def _run(cmd: list[str]) -> str | None:
    """Run a compiler command; its error (the command and the end of its stderr), or None. An
    interrupt while it runs (a KeyboardInterrupt in this thread) kills the compiler first."""
    proc = None
    try:
        with _RUNNING_LOCK:
            if _INTERRUPTED.is_set():
                return f"{' '.join(cmd)}: not started, the build was interrupted"
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_OWN_GROUP)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"{' '.join(cmd)}: {exc}"
            _RUNNING.add(proc)
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired as exc:
        _kill(proc)
        proc.communicate()
        return f"{' '.join(cmd)}: {exc}"
    except BaseException:  # an interrupt, at any point once the compiler started
        if proc is not None:
            _kill(proc)
            proc.communicate()
        raise
    finally:
        if proc is not None:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if proc.returncode != 0:
        return f"{' '.join(cmd)} failed:\n{stderr.strip()[-2000:]}"
    return None


def _run_to(target: Path, cmd: list[str]) -> str | None:
    """Run cmd with ``-o`` a temporary file next to target, then rename it into place (so that a
    concurrent first use never loads half a file). Returns an error or None."""
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        err = _run([*cmd, "-o", tmp])
    except BaseException:  # interrupted: no half-written file left in the cache
        os.unlink(tmp)
        raise
    if err is not None:
        os.unlink(tmp)
        return err
    os.replace(tmp, target)
    return None


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
            err = _compile(cxx, flags, target)
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
