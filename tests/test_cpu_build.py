"""How the CPU kernels are built (bnlab.backends.cpu_build). The first use on a new machine compiles
them: bnlab says so on stderr while it waits, and when it is done or has failed; a cached library
loads silently. With two cores or more the compile runs in parts at once and links them; a part that
fails, or a single core, takes the one-file build. (That both builds compute the same bits is
test_backend_cpu_isa.py's background check.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bnlab.backends import cpu_build, cpu_build_torch, cpu_compile


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """cpu_build as in a new process with an empty cache in tmp_path; its state restored after."""
    saved = dict(cpu_build._state)
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BNLAB_CPU_KERNELS", raising=False)
    yield tmp_path
    cpu_build._state.clear()
    cpu_build._state.update(saved)


def test_a_compile_is_announced_and_timed_and_a_cached_library_loads_silently(fresh_state, monkeypatch, capsys):
    built = cpu_build.load()
    if built is None or cpu_build.library_path() is None:
        pytest.skip(f"the CPU kernels did not build here: {cpu_build.load_error()}")
    real = cpu_build.library_path()

    def compile_by_copy(cxx, flags, target):  # the real library stands in for a fresh compile
        shutil.copyfile(real, target)
        return None

    monkeypatch.setattr(cpu_build, "_variants", lambda: [("ctypes", ["-fopenmp"])])
    monkeypatch.setattr(cpu_build, "compile_library", compile_by_copy)
    capsys.readouterr()
    assert cpu_build._build_and_load() is not None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("bnlab: compiling its CPU kernels for this machine, once (ctypes build")
    assert str(fresh_state) in err[0]
    assert err[1].startswith("bnlab: CPU kernels compiled in ") and err[1].endswith(" s")
    assert cpu_build._build_and_load() is not None  # now cached: no compile, no message
    assert capsys.readouterr().err == ""


def test_failed_builds_are_announced_with_the_fallback(fresh_state, monkeypatch, capsys):
    monkeypatch.setattr(cpu_build, "_variants", lambda: [("ctypes", ["-fopenmp"]), ("ctypes", [])])
    monkeypatch.setattr(cpu_build, "_compiler", lambda: "g++")
    monkeypatch.setattr(cpu_build, "compile_library", lambda cxx, flags, target: f"g++ {' '.join(flags)} failed: no")
    assert cpu_build._build_and_load() is None
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0].split(" after")[0] for line in err] == [
        "bnlab: compiling its CPU kernels for this machine, once", "bnlab: that build failed",
        "bnlab: compiling its CPU kernels for this machine, once", "bnlab: that build failed",
        "bnlab: no build of the CPU kernels worked: the portable backend runs instead, slower",
    ]  # fmt: skip
    assert "g++ -fopenmp failed: no" in cpu_build._state["error"]


class FakeCompiler:
    """Stands in for cpu_compile._run: records each command and writes its -o file (an object or the
    library), or fails the commands that `fail` picks."""

    def __init__(self, fail=lambda cmd: False, content=b"\x7fELF"):
        self.commands: list[list[str]] = []
        self.fail = fail
        self.content = content
        self.linked: dict[str, bytes] = {}  # the objects of the last link command: name -> content

    def __call__(self, cmd):
        self.commands.append(cmd)
        if "-shared" in cmd and "-c" not in cmd:
            self.linked = {Path(a).name: Path(a).read_bytes() for a in cmd if a.endswith(".o")}
        if self.fail(cmd):
            return f"{' '.join(cmd)} failed:\nerror: no"
        with open(cmd[cmd.index("-o") + 1], "wb") as f:
            f.write(self.content)
        return None


def test_two_cores_compile_the_parts_at_once_then_link_them(monkeypatch, tmp_path):
    fake = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    assert cpu_compile.compile_library("g++", ["-march=native", "-fopenmp"], target) is None
    *parts, link = fake.commands
    macros = sorted(next(f for f in cmd if f.startswith("-DBNLAB_PART")) for cmd in parts)
    assert macros == ["-DBNLAB_PART_DTYPE=0", "-DBNLAB_PART_DTYPE=1", "-DBNLAB_PART_DTYPE=2",
                      "-DBNLAB_PART_DTYPE=3", "-DBNLAB_PART_MAIN"]  # fmt: skip
    for cmd in parts:
        assert "-c" in cmd and "-shared" not in cmd and "-march=native" in cmd and cmd[-3].endswith("cpu_kernels.cpp")
    objects = [cmd[cmd.index("-o") + 1] for cmd in parts]
    assert link[:3] == ["g++", "-shared", "-fopenmp"] and link[3:-2] == objects
    assert target.read_bytes() == b"\x7fELF" and sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


def test_a_part_that_fails_falls_back_to_the_one_file_build(monkeypatch, tmp_path):
    fake = FakeCompiler(fail=lambda cmd: "-DBNLAB_PART_DTYPE=2" in cmd)
    monkeypatch.setattr(cpu_compile, "_run", fake)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    assert cpu_compile.compile_library("g++", ["-fopenmp"], target) is None
    whole = fake.commands[-1]
    assert "-shared" in whole and "-c" not in whole and not any(f.startswith("-DBNLAB_PART") for f in whole)
    assert len(fake.commands) == 6  # five parts (no link after the failure), then the one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


KEPT = b"\x7fELF, compiled before an interrupt"


class InterruptedCompiler(FakeCompiler):
    """A FakeCompiler during whose command that `interrupt` picks Ctrl-C reaches the main thread: the
    command then waits, as a compiler runs, until the interrupted build stops it (as _run's killed
    compiler, it answers an error)."""

    def __init__(self, interrupt):
        super().__init__(content=KEPT)
        self.interrupt = interrupt

    def __call__(self, cmd):
        if not self.interrupt(cmd):
            return super().__call__(cmd)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        assert cpu_compile._INTERRUPTED.wait(10)
        return f"{' '.join(cmd)}: killed"


def _object(cmd: list[str]) -> str:
    return Path(cmd[cmd.index("-o") + 1]).name


def _interrupted_build(monkeypatch, target: Path, flags: list[str]) -> set[str]:
    """A parts build of target that Ctrl-C interrupts during the DTYPE=1 part; the parts it finished."""
    interrupted = InterruptedCompiler(interrupt=lambda cmd: "-DBNLAB_PART_DTYPE=1" in cmd)
    monkeypatch.setattr(cpu_compile, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cpu_compile.compile_library("g++", flags, target)
    finished = {_object(cmd) for cmd in interrupted.commands}
    assert "part0.o" in finished and "part2.o" not in finished  # DTYPE=0 before, DTYPE=1 interrupted
    kept = {cpu_compile._kept_path(target.with_suffix(".parts"), cmd[: cmd.index("-o")]).name
            for cmd in interrupted.commands}  # fmt: skip
    assert {p.name for p in target.with_suffix(".parts").iterdir()} == kept and len(kept) == len(finished)
    assert sorted(p.name for p in target.parent.iterdir()) == ["lib.parts"]  # no temporary file or folder
    return finished


@pytest.mark.parametrize("torch_build", [False, True], ids=["module", "torch"])
def test_an_interrupted_build_keeps_its_finished_parts_and_the_next_compiles_only_the_rest(
    monkeypatch, tmp_path, torch_build
):
    # before: the parts folder was a temporary one, and Ctrl-C during the first call lost every part
    # compiled (up to half a minute of compiling)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    flags = ["-fopenmp", *([cpu_build.TORCH_API] if torch_build else [])]
    target = tmp_path / "lib.so"
    finished = _interrupted_build(monkeypatch, target, flags)

    fake = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    assert cpu_compile.compile_library("g++", flags, target) is None
    *parts, link = fake.commands
    everything = {*(["torch.o"] if torch_build else []), *(f"part{i}.o" for i in range(5))}
    assert sorted(_object(cmd) for cmd in parts) == sorted(everything - finished)
    linked = fake.linked
    assert list(linked) == [*(["torch.o"] if torch_build else []), *[f"part{i}.o" for i in range(5)]]
    assert {name for name, content in linked.items() if content == KEPT} == finished
    assert target.read_bytes() == b"\x7fELF" and sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]

    # kept parts are taken only by the same command: another build (other flags, as if another
    # bnlab's parts had other macros) of a library of the same name compiles them all
    target.unlink()
    _interrupted_build(monkeypatch, target, flags)
    other = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", other)
    assert cpu_compile.compile_library("g++", [*flags, "-DOTHER"], target) is None
    assert len(other.commands) == len(everything) + 1


def test_kept_parts_stay_this_builds_when_another_build_removes_them(monkeypatch, tmp_path):
    # two processes building the same library at once: the first to finish removes the kept parts
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    finished = _interrupted_build(monkeypatch, target, ["-fopenmp"])

    class OtherBuildFinishes(FakeCompiler):
        def __call__(self, cmd):
            shutil.rmtree(tmp_path / "lib.parts", ignore_errors=True)
            return super().__call__(cmd)

    fake = OtherBuildFinishes()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    assert cpu_compile.compile_library("g++", ["-fopenmp"], target) is None
    assert len(fake.commands) == 5 - len(finished) + 1  # the parts not kept, and the link
    assert {name for name, content in fake.linked.items() if content == KEPT} == finished and len(fake.linked) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


def test_a_kept_part_that_is_not_an_object_is_compiled_again(monkeypatch, tmp_path):
    # an empty file (a crash right after the part was kept) linked into a library that failed to
    # load, and stayed in the cache (a reviewer's reproduction); the linker takes empty files
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    finished = _interrupted_build(monkeypatch, target, ["-fopenmp"])
    emptied = sorted(target.with_suffix(".parts").iterdir())[0]
    emptied.write_bytes(b"")
    fake = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    assert cpu_compile.compile_library("g++", ["-fopenmp"], target) is None
    assert len(fake.commands) == 5 - len(finished) + 1 + 1  # the parts not kept, the emptied one, the link
    assert sorted(fake.linked.values()).count(KEPT) == len(finished) - 1 and b"" not in fake.linked.values()


def test_kept_parts_go_once_a_one_file_build_made_the_library(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    _interrupted_build(monkeypatch, target, ["-fopenmp"])
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 1)  # one core now: the one-file build
    fake = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    assert cpu_compile.compile_library("g++", ["-fopenmp"], target) is None
    assert len(fake.commands) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


def test_one_core_builds_in_one_file_and_a_failure_is_reported(monkeypatch, tmp_path):
    fake = FakeCompiler(fail=lambda cmd: True)
    monkeypatch.setattr(cpu_compile, "_run", fake)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 1)
    error = cpu_compile.compile_library("g++", ["-fopenmp"], tmp_path / "lib.so")
    assert len(fake.commands) == 1 and error.startswith("g++ -O3") and "error: no" in error
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_the_torch_build_compiles_its_extra_file_in_cpp20_and_links_torch(monkeypatch, tmp_path):
    fake = FakeCompiler()
    monkeypatch.setattr(cpu_compile, "_run", fake)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    target = tmp_path / "lib.so"
    flags = ["-march=native", "-fopenmp", cpu_build.TORCH_API, "-I/torch/include"]
    assert cpu_compile.compile_library("g++", flags, target) is None
    torch_part, *parts, link = fake.commands
    assert torch_part[-3].endswith(cpu_compile.TORCH_SOURCE) and "-c" in torch_part
    assert torch_part.index("-std=c++20") > torch_part.index("-std=c++17")  # the later flag is the one g++ takes
    assert len(parts) == 5 and all(cmd[-3].endswith("cpu_kernels.cpp") and cpu_build.TORCH_API in cmd for cmd in parts)
    objects = [cmd[cmd.index("-o") + 1] for cmd in [torch_part, *parts]]
    lib_dir = cpu_build_torch.paths()[1]
    assert link[3 : 3 + len(objects)] == objects
    assert {"-ltorch_python", "-ltorch_cpu", "-lc10", f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"} <= set(link)


def test_a_torch_build_that_fails_is_reported_without_a_one_file_retry(monkeypatch, tmp_path):
    # The one file cannot hold the torch build's extra part: the failure goes to _build_and_load,
    # which then builds the plain extension module.
    fake = FakeCompiler(fail=lambda cmd: cmd[-3].endswith(cpu_compile.TORCH_SOURCE))
    monkeypatch.setattr(cpu_compile, "_run", fake)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 1)
    error = cpu_compile.compile_library("g++", ["-fopenmp", cpu_build.TORCH_API], tmp_path / "lib.so")
    assert error is not None and cpu_compile.TORCH_SOURCE in error and "error: no" in error
    assert all("-c" in cmd for cmd in fake.commands)  # six parts, no link, no one-file build
    assert len(fake.commands) == 6 and list(tmp_path.iterdir()) == []


def test_the_torch_build_comes_first_and_its_key_follows_torch(monkeypatch):
    kinds = [kind for kind, _ in cpu_build._variants()]
    if cpu_build._python_include() is None or not cpu_build_torch.compile_flags():
        pytest.skip("no Python.h or no torch headers here: no torch build to try")
    assert kinds[:2] == ["torch", "module"] and set(kinds[2:]) == {"ctypes"}
    torch_flags = cpu_build._variants()[0][1]
    before = cpu_build._key("g++", torch_flags)
    monkeypatch.setattr(cpu_build_torch, "identity", lambda: ("9.9.9", "/elsewhere/libtorch_python.so", "1:2"))
    assert cpu_build._key("g++", torch_flags) != before
    module_flags = cpu_build._variants()[1][1]
    assert cpu_build.TORCH_API not in module_flags  # the plain module's key does not depend on torch's build


class RecordingPopen(subprocess.Popen):
    """subprocess.Popen that keeps every process it starts (to see that each ended)."""

    started: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingPopen.started.append(self)


def _ctrl_c_in(seconds: float) -> threading.Timer:
    """SIGINT to the main thread after ``seconds``, as Ctrl-C at a terminal (a blocked wait there
    wakes; _thread.interrupt_main would wait for it to end)."""
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


def _alive(pid: int) -> bool:
    """Whether process pid runs (a zombie, ended but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes' states in /proc")
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("own_group", [True, False], ids=["group", "no-group"])
def test_ctrl_c_during_the_parts_kills_the_compilers_at_once(monkeypatch, tmp_path, jobs, own_group):
    # before: the executor's exit ran every queued part, and Ctrl-C acted after about 23 s; and a
    # compiler driver killed alone left its cc1plus running, holding the pipes the wait read (so on
    # Python 3.10, which has no process_group for Popen: the no-group case)
    if not own_group:
        monkeypatch.setattr(cpu_compile, "_OWN_GROUP", {})
    elif not cpu_compile._OWN_GROUP:
        pytest.skip("Popen's process_group is Python 3.11's")
    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(RecordingPopen, "started", [])
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: jobs)
    # each "compiler" a driver running a child, as g++ runs cc1plus; the child's pid in a file
    commands = [["sh", "-c", f"sleep 20 & echo $! > {tmp_path}/child{i}; wait"] for i in range(5)]
    start = time.monotonic()
    timer = _ctrl_c_in(0.5)
    with pytest.raises(KeyboardInterrupt):
        cpu_compile._run_all(commands)
    timer.join()
    assert time.monotonic() - start < 5
    assert 1 <= len(RecordingPopen.started) <= jobs  # the parts not started never start
    children = [int(path.read_text()) for path in tmp_path.iterdir()]
    assert len(children) == len(RecordingPopen.started)
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)
    assert all(proc.poll() is not None for proc in RecordingPopen.started) and not cpu_compile._RUNNING
    assert cpu_compile._run(["true"]) is None  # and the next build runs (a retry, the link)


def test_ctrl_c_during_the_link_kills_it_and_leaves_no_temporary_file(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(RecordingPopen, "started", [])
    timer = _ctrl_c_in(0.5)
    with pytest.raises(KeyboardInterrupt):
        cpu_compile._run_to(tmp_path / "lib.so", ["sh", "-c", "sleep 20", "link"])
    timer.join()
    assert [proc.poll() is not None for proc in RecordingPopen.started] == [True]
    assert list(tmp_path.iterdir()) == []


def test_a_build_removes_what_unfinished_builds_left_a_week_ago(monkeypatch, tmp_path):
    # before: kept parts of a library never built again (a new bnlab or torch came first), and what a
    # killed build left, stayed in the cache for good (about 2 MB each)
    monkeypatch.setattr(cpu_compile, "_parallel_jobs", lambda: 2)
    week_ago = time.time() - cpu_compile.STALE_BUILD_SECONDS - 60
    entries = {
        "bnlab_cpu_torch_0123456789abcdef.parts": ("dir", week_ago),  # a Ctrl-C'd build of another library
        "bnlab_cpu_module_0123456789abcdef.building.k2j4x": ("dir", week_ago),  # a killed build's folder
        "bnlab_cpu_torch_0123456789abcdef.a8f3.tmp.so": ("file", week_ago),  # a killed link's output
        "bnlab_cpu_torch_fedcba9876543210.parts": ("dir", time.time() - 3600),  # an hour ago: resumed soon, kept
        "bnlab_cpu_torch_fedcba9876543210.so": ("file", week_ago),  # a built library: never removed here
        "notes.parts": ("dir", week_ago),  # not bnlab's
    }
    for name, (kind, mtime) in entries.items():
        path = tmp_path / name
        if kind == "dir":
            path.mkdir()
            (path / "part0.o").write_bytes(b"\x7fELF")
        else:
            path.write_bytes(b"\x7fELF")
        os.utime(path, (mtime, mtime))
    failing = FakeCompiler(fail=lambda cmd: True)
    monkeypatch.setattr(cpu_compile, "_run", failing)
    assert cpu_compile.compile_library("g++", ["-fopenmp"], tmp_path / "bnlab_cpu_module_1111.so") is not None
    assert {p.name for p in tmp_path.iterdir()} == set(entries)  # a failed build removes nothing
    monkeypatch.setattr(cpu_compile, "_run", FakeCompiler())
    assert cpu_compile.compile_library("g++", ["-fopenmp"], tmp_path / "bnlab_cpu_module_1111.so") is None
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"bnlab_cpu_module_1111.so", "bnlab_cpu_torch_fedcba9876543210.parts",
                    "bnlab_cpu_torch_fedcba9876543210.so", "notes.parts"}  # fmt: skip
