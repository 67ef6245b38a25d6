"""The environment variables of the CPU kernels (cpu_environment): a malformed value is an error naming
the variable, never a silent setting (the kernels read them with C's atoll, which takes "4G" for
4 and "1e9" for 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bnlab.backends import cpu_environment

MALFORMED = ["4G", "1e9", "-5", "", "0x10", "1_000", "12 MB", "\u0663", str(2**63)]
WELL_FORMED = ["0", "33554432", " 4096 ", str(2**63 - 1)]


@pytest.mark.parametrize("name", cpu_environment.BYTE_VARIABLES)
@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_value_is_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}: expected a whole number of bytes.*got {value!r}"):
        cpu_environment.check_environment()


@pytest.mark.parametrize("name", cpu_environment.BYTE_VARIABLES)
@pytest.mark.parametrize("value", WELL_FORMED)
def test_whole_numbers_are_accepted(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    cpu_environment.check_environment()  # raises nothing


def test_unset_variables_are_accepted(monkeypatch):
    for name in cpu_environment.BYTE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cpu_environment.check_environment()


@pytest.mark.parametrize("value", ["no", "off", "", "2", "true"])
def test_a_switch_other_than_0_or_1_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv("BNLAB_TORCH_API", value)
    expected = f"^BNLAB_TORCH_API: expected 0 \\(off\\) or 1 \\(on\\), got {value!r}$"
    with pytest.raises(ValueError, match=expected):
        cpu_environment.check_environment()


@pytest.mark.parametrize("value", ["0", "1", " 0 "])
def test_a_switch_of_0_or_1_is_accepted(monkeypatch, value):
    monkeypatch.setenv("BNLAB_TORCH_API", value)
    cpu_environment.check_environment()  # raises nothing


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


def test_a_bn_call_with_a_malformed_pool_limit_raises_instead_of_running():
    # The first use of the kernels checks the environment; the error reaches the caller rather
    # than turning into a silent fallback to the portable backend.
    done = _run(
        "import torch, bnlab\nbnlab.BatchNorm1d(3)(torch.randn(4, 3))\nprint('ran')",
        BNLAB_CPU_CACHE_BYTES="4G",
    )
    assert done.returncode != 0 and "ran" not in done.stdout
    assert "ValueError: BNLAB_CPU_CACHE_BYTES: expected a whole number of bytes" in done.stderr


def test_a_zero_pool_limit_written_with_leading_zeros_turns_the_pool_off():
    # "00" is 0 to the kernels' atoll; the Python side must read it the same way.
    code = (
        "import torch, bnlab\n"
        "from bnlab.backends import cpu_pool\n"
        "x = torch.randn(64, 16, 32, 32)\n"
        "y = bnlab.BatchNorm2d(16)(x)\n"
        "print(cpu_pool._state['enabled'], bnlab.cpu_cache_info()['misses'])"
    )
    done = _run(code, BNLAB_CPU_CACHE_BYTES="00")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]
