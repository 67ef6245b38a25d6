"""The `bnlab` console script's entry point (src/bnlab_console.py): a Ctrl-C while torch is imported
ends in one line and exit status 130, as a Ctrl-C anywhere later does, not in a traceback of the
import. Each case runs in a new interpreter, where torch is not imported yet; the interrupt is
raised by an import hook at torch's import, so the test does not depend on timing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A finder consulted before the real ones: importing torch raises KeyboardInterrupt, as a Ctrl-C in
# the middle of torch's import does.
_INTERRUPT_AT_TORCH = """
import sys
class InterruptAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None
sys.meta_path.insert(0, InterruptAtTorch())
import bnlab_console
sys.argv = ["bnlab", "list"]
sys.exit(bnlab_console.main())
"""


def _run(debug: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_DEBUG"}
    if debug:
        env["BNLAB_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-c", _INTERRUPT_AT_TORCH], capture_output=True, text=True, env=env,
                          timeout=120)


def test_ctrl_c_while_torch_is_imported_ends_in_one_line_and_130():
    done = _run(debug=False)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["bnlab: interrupted while starting (importing torch); nothing had run"]
    assert done.stdout == ""  # the command did not run


def test_bnlab_debug_shows_the_traceback_of_the_interrupted_import():
    done = _run(debug=True)
    assert done.returncode != 0 and done.returncode != 130
    assert "Traceback" in done.stderr and done.stderr.strip().endswith("KeyboardInterrupt")


def test_the_console_script_runs_the_entry_outside_the_package():
    # An entry point inside bnlab would import torch before any handler runs.
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert [line for line in scripts.splitlines() if line.startswith("bnlab ")] == ['bnlab = "bnlab_console:main"']
    source = (ROOT / "src" / "bnlab_console.py").read_text()
    assert "\nimport torch" not in source and "\nfrom bnlab" not in source  # imports bnlab only inside main


def test_the_entry_runs_the_command_line(capsys, monkeypatch):
    import bnlab_console

    monkeypatch.setattr(sys, "argv", ["bnlab", "list"])
    assert bnlab_console.main() == 0
    assert "init-sweep" in capsys.readouterr().out
