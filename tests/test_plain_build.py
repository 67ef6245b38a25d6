"""The plain extension module: the compiled calls on the Python C API alone.

The torch build (cpu_kernels_torch.cpp, tried first) is what every other test runs on wherever
torch ships its headers; the plain build is what runs where that file does not compile. Its
glue differs (cpu_kernels_py_tensors.inc, cpu_kernels_py_eval.inc and cpu_kernels_py_train.inc
without BNLAB_TORCH_API: the tensors read through Python calls, outputs from torch.empty_like
and DLPack), so the tests of the
compiled calls and of the pool run once more here, on it, in a process started with
BNLAB_TORCH_API=0 (which builds it, once per source version, into the same cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.backends import cpu_build

TESTS = Path(__file__).resolve().parent
#: The tests whose subject has a second implementation in the plain build.
FILES = [
    "test_backend_cpu_eval_entry.py",
    "test_backend_cpu_train_entry.py",
    "test_backend_cpu_eval_graph.py",
    "test_backend_cpu_pool.py",
    "test_layer_call.py",
    "test_resolved_views.py",
    "test_fake_and_traced.py",
]


def test_the_compiled_calls_and_the_pool_pass_on_the_plain_build():
    if cpu_build.load() is None or cpu_build._python_include() is None:
        pytest.skip(f"no extension module builds here: {cpu_build.load_error()}")
    env = {**os.environ, "BNLAB_TORCH_API": "0"}
    check = "from bnlab.backends import cpu_build; cpu_build.load(); print(cpu_build._state['variant'][0])"
    kind = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600)
    assert kind.stdout.strip() == "module", kind.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(TESTS / f) for f in FILES]],
        env=env, capture_output=True, text=True, timeout=900, cwd=TESTS.parent,
    )  # fmt: skip
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail and " error" not in tail
