"""Package hygiene: what importing bnlab pulls in, the kernel sources its build key covers, and the
selfcheck command."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import bnlab
from bnlab.backends import cpu_build
from bnlab.lab.cli import main

SRC = pathlib.Path(bnlab.__file__).parent


def test_import_bnlab_does_not_import_the_lab_or_plotting():
    # (tqdm is not checked: torch itself imports it when it is installed.)
    code = "import sys, bnlab; bad = [m for m in ('bnlab.lab', 'matplotlib', 'triton') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import bnlab imported {out}"


def test_library_modules_never_import_the_lab():
    for path in SRC.rglob("*.py"):
        if "lab" in path.relative_to(SRC).parts or path.name == "__main__.py":  # the CLI entry point
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("bnlab.lab") for n in names), f"{path} imports the lab"


def test_the_cpu_build_key_covers_every_kernel_source():
    # The compiled kernels are cached under a hash of cpu_build.SOURCES: a source missing there
    # would leave a changed kernel running its stale build.
    sources = {p.name for p in (SRC / "backends").iterdir() if p.suffix in (".cpp", ".inc", ".h")}
    assert set(cpu_build.SOURCES) == sources


def test_reference_is_numpy_only():
    tree = ast.parse((SRC / "reference.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"numpy", "__future__", "dataclasses"}, imported


def test_selfcheck_command_reports_agreement(capsys):
    assert main(["selfcheck", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "all within tolerance" in out
    assert out.count(" yes") == 8 and " NO" not in out
    assert out.startswith("backend for CPU tensors: ")  # which backend ran the comparison (bnlab.backends.describe)
