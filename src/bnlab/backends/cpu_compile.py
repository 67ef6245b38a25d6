"""Turn bnlab's CPU kernel sources into a library with the C++ compiler (cpu_build caches and loads it).

In one compiler run, or in parts at once on two cores or more, then linked; each through a
temporary file renamed into place. The compilers run in processes of their own groups, which an
interrupted build (Ctrl-C while the first call waits) kills, with the parts not started dropped;
the parts it finished are kept for the next build (:func:`_compile_parts`).
Every function returns an error (the command and the end of its stderr) or None.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bnlab.backends import cpu_build_torch as torch_build

__all__ = ["BASE_FLAGS", "MAIN_SOURCE", "compile_library"]

_HERE = Path(__file__).resolve().parent
#: the file the compiler is given (it includes the .inc files of cpu_build.SOURCES)
MAIN_SOURCE = "cpu_kernels.cpp"
TORCH_SOURCE, TORCH_API = torch_build.SOURCE, torch_build.API
# -fno-math-errno: std::sqrt sets no errno (nothing reads it), so loops of square roots vectorise;
# the results are the same correctly rounded values. -falign-loops=64: every loop starts on a cache
# line, so that a kernel's speed does not hang on where unrelated code moved it. Without it, an
# edit of the by-sample passes alone made the untouched channel-group forward of (64, 512, 3, 3)
# 1.11-1.17x slower; with it, the same edit changed nothing (docs/benchmark_rounds.md, seventh session).
BASE_FLAGS = ["-O3", "-falign-loops=64", "-fno-math-errno", "-fPIC", "-shared", "-std=c++17"]


def compile_library(cxx: str, flags: list[str], target: Path) -> str | None:
    """Compile to a temporary file next to target, then rename it into place. Returns an error or None.

    With two cores or more, in parts at once (:func:`_compile_parts`: 18.0 s against 26.8 s in one
    file on the project's 2-core Zen 3 VM, less with more cores; the same bits); in one file with
    one core, or when the parts do not build or link (the one file then says why, if it fails too).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    error = _compile(cxx, flags, target)
    if error is None:
        _drop_stale_builds(target.parent)
    return error


def _compile(cxx: str, flags: list[str], target: Path) -> str | None:
    if TORCH_API in flags:  # its extra file is a part of its own: parts only, even on one core
        return _compile_parts(cxx, flags, target)
    if _parallel_jobs() > 1 and _compile_parts(cxx, flags, target) is None:
        return None
    error = _compile_whole(cxx, flags, target)
    if error is None:  # parts an interrupted parts build kept are of no more use
        shutil.rmtree(_kept_folder(target), ignore_errors=True)
    return error


#: Age after which what an unfinished build left in the cache goes: an interrupted build is taken up
#: again at the next first call, within days, or never (a new bnlab or torch builds another library).
STALE_BUILD_SECONDS = 7 * 24 * 3600


def _drop_stale_builds(cache: Path) -> None:
    """Remove from ``cache`` what builds of any bnlab library left there more than
    STALE_BUILD_SECONDS ago without finishing: kept parts (``*.parts``, about 2 MB; a Ctrl-C keeps
    them for the next build of the same library, which removes them), and the temporary build
    folders and half-linked libraries (``*.building.*``, ``*.tmp.so``) a killed process leaves.
    Called after a build succeeded; a build in progress elsewhere is minutes old, never touched."""
    now = time.time()
    for pattern in ("bnlab_cpu_*.parts", "bnlab_cpu_*.building.*", "bnlab_cpu_*.tmp.so"):
        for entry in cache.glob(pattern):
            try:
                if now - entry.lstat().st_mtime <= STALE_BUILD_SECONDS:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:  # gone meanwhile (another process cleaning up), or not ours to remove
                continue


def _compile_whole(cxx: str, flags: list[str], target: Path) -> str | None:
    """The library from cpu_kernels.cpp in one compiler run (through a temporary file). Error or None."""
    return _run_to(target, [cxx, *BASE_FLAGS, *flags, str(_HERE / MAIN_SOURCE)])


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
    links torch's libraries. Returns an error or None.

    Each part, once compiled, is also kept in ``<target stem>.parts`` beside target, under a name
    made from its command (:func:`_kept_path`), which an interrupted build (Ctrl-C during the first
    call) leaves: the next build of the same library (the same file name: the same sources, flags,
    compiler and torch) takes the parts of the same commands from there and compiles only the rest.
    Built or failed, the build leaves no file but the library: the parts folder goes too (a failed
    part means no part is worth keeping)."""
    compile_flags = [f for f in BASE_FLAGS if f != "-shared"] + flags
    link_extra = []
    kept = _kept_folder(target)
    with tempfile.TemporaryDirectory(prefix=target.stem + ".building.", dir=target.parent) as folder:
        names = [f"part{i}.o" for i in range(len(_PARTS))]
        commands = [[cxx, *compile_flags, *part, "-c", str(_HERE / MAIN_SOURCE)] for part in _PARTS]
        if TORCH_API in flags:
            names.insert(0, "torch.o")
            commands.insert(0, [cxx, *compile_flags, "-std=c++20", "-c", str(_HERE / TORCH_SOURCE)])
            link_extra = torch_build.link_flags()
        objects = [Path(folder) / name for name in names]
        interrupted = False
        # parts an interrupted build kept, linked into this build's folder: they stay this build's
        # even if another process finishing the same library removes the kept folder meanwhile
        parts = [(cmd, obj, _kept_path(kept, cmd)) for cmd, obj in zip(commands, objects)]
        todo = [(cmd, obj, at) for cmd, obj, at in parts if not _take_kept(at, obj)]
        runs = [[*cmd, "-o", str(obj)] for cmd, obj, _ in todo]
        try:
            errors = [err for err in _run_all(runs, [at for _, _, at in todo]) if err is not None]
            if errors:
                return errors[0]
            openmp = [f for f in flags if f == "-fopenmp"]
            return _run_to(target, [cxx, "-shared", *openmp, *map(str, objects), *link_extra])
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:  # built, failed or broken off by an error: nothing is left to resume
            if not interrupted:
                shutil.rmtree(kept, ignore_errors=True)


def _kept_folder(target: Path) -> Path:
    """Where the parts of target's build are kept for a build after an interrupted one."""
    return target.parent / f"{target.stem}.parts"


def _kept_path(kept: Path, cmd: list[str]) -> Path:
    """Where a part compiled by ``cmd`` (without its ``-o``) is kept: named by a digest of the
    command, so that only the same command, never a part of another layout, takes it."""
    return kept / (hashlib.sha256("\0".join(cmd).encode()).hexdigest()[:16] + ".o")


def _take_kept(kept: Path, obj: Path) -> bool:
    """Whether a part kept by an interrupted build is now at obj (a hard link, else a copy). Only
    an object file is taken (on Linux an ELF file; elsewhere any file not empty): the linker takes
    an empty file, and a library linked from one would stay in the cache, failing to load."""
    if not _an_object(kept):
        return False
    try:
        _link_or_copy(kept, obj)
    except OSError:  # none kept (or another build removed it just now), or no copy
        return False
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst a hard link to src, or a copy where this file system has no hard links.
    FileNotFoundError where src is not there."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


def _an_object(path: Path) -> bool:
    """Whether path is a file that can be an object file (see :func:`_take_kept`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"\x7fELF" if sys.platform.startswith("linux") else len(head) > 0


def _keep(obj: Path, kept: Path) -> None:
    """Keep a compiled part for a build after an interrupted one (:func:`_compile_parts`): put in
    under a temporary name, then renamed, so the folder never holds half an object. Best effort:
    a part that cannot be kept is compiled again if the build is interrupted."""
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(obj, "rb") as f:
            os.fsync(f.fileno())  # on disk before it is kept (a crash must not leave it empty)
        kept.parent.mkdir(exist_ok=True)
        _link_or_copy(obj, tmp)
        os.replace(tmp, kept)
    except OSError:
        tmp.unlink(missing_ok=True)


def _run_all(commands: list[list[str]], keep_as: list[Path] | None = None) -> list[str | None]:
    """Each command's error or None (:func:`_run`), up to _parallel_jobs() of them at a time; with
    ``keep_as``, the object each command compiled (its ``-o``) is kept at its path there as soon as
    the command succeeds (:func:`_keep`).

    Interrupted (Ctrl-C reaches the main thread waiting here), the compilers running are killed and
    the commands not started are dropped before the interrupt goes on: the pool's own exit had run
    every queued part first, and Ctrl-C took about 23 s to act (the fifty-first session's audit)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, min(_parallel_jobs(), len(commands))))
    try:
        return list(pool.map(_run_and_keep, commands, keep_as or [None] * len(commands)))
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
#: (tests/background_checks.py). On Python 3.10, no group: _kill stops the driver and ends the
#: processes it started, found in /proc.
_OWN_GROUP = {"process_group": 0} if os.name == "posix" and sys.version_info >= (3, 11) else {}
_RUNNING_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()


def _run_and_keep(cmd: list[str], kept: Path | None) -> str | None:
    """_run(cmd), then, with ``kept`` and no error, the object it wrote (its ``-o``) kept there (:func:`_keep`)."""
    error = _run(cmd)
    if error is None and kept is not None:
        _keep(Path(cmd[cmd.index("-o") + 1]), kept)
    return error


def _kill(proc: subprocess.Popen) -> None:
    """Ends a compiler that _run started, with the processes it started: its process group, or,
    without one (Python 3.10), the driver stopped first (so that it starts nothing more) and every
    process under it that /proc shows."""
    try:
        if _OWN_GROUP:
            os.killpg(proc.pid, 9)  # SIGKILL (signal.SIGKILL is absent on Windows)
            return
        if os.name == "posix" and os.path.isdir("/proc"):  # Linux: POSIX signals, and /proc to read
            os.kill(proc.pid, signal.SIGSTOP)
            stopped: set[int] = set()
            for _ in range(8):  # each process found stopped, until no new one shows (one started
                found = set(_descendants(proc.pid)) - stopped  # between a scan and a kill lives on)
                if not found:
                    break
                for pid in found:
                    _signal(pid, signal.SIGSTOP)
                stopped |= found
            for pid in stopped:
                _signal(pid, signal.SIGKILL)
        proc.kill()
    except (ProcessLookupError, PermissionError):
        pass  # ended already


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # ended already


def _descendants(root: int) -> list[int]:
    """The processes under process ``root`` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])  # after the name: state, ppid
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
