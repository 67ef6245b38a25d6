"""The environment variables bnlab's CPU kernels read, checked before the first kernel use.

The kernels read their byte-count settings once, in C, with ``atoll``, which takes "4G" for 4 and
"1e9" for 1 without complaint; the build reads its switches as strings. Both are checked here
first (:func:`check_environment`, called by ``cpu_build.load``), so that a typo is an error naming
the variable, not a silent setting.
"""

from __future__ import annotations

import os
import re

__all__ = ["BYTE_VARIABLES", "SWITCH_VARIABLES", "check_environment", "env_bytes"]

#: Byte counts the kernels read from the environment once, with C's atoll, which takes "4G" for 4
#: and "1e9" for 1 without complaint: checked here first, so a typo is an error, not a silent setting.
BYTE_VARIABLES = (
    "BNLAB_CPU_CACHE_BYTES",  # the output pool's idle-byte limit (a user setting, README)
    "BNLAB_STREAM_MIN_BYTES",  # tuning: non-temporal stores from this input size
    "BNLAB_NCL_FLAT_MAX_BYTES",  # tuning: two-pass NCL walk below this input size
    "BNLAB_NCL_GROUP_BYTES",  # tuning: NCL channel groups of at most this many input bytes
    "BNLAB_NLC_GROUP_MAX_BYTES",  # tuning: channel-group NLC walk below this input size
    "BNLAB_NLC_NARROW_MAX_BYTES",  # tuning: narrow NLC walks (inputs of at most 16 rows) up to this size
    "BNLAB_WRITE_AHEAD_MIN_BYTES",  # tuning: NCL normalize requests output lines ahead above this size
    "BNLAB_LAST_FIRST_MIN_BYTES",  # tuning: second passes walk a thread's share back from this size
    "BNLAB_EVAL_CACHE_BYTES",  # eval's kept coefficient rows, per thread (0: none kept)
)
_WHOLE_NUMBER = re.compile(r"\s*[0-9]+\s*", re.ASCII)


def env_bytes(name: str) -> int | None:
    """The byte count of environment variable ``name`` as the kernels read it; None when it is unset
    or not a whole number of bytes that fits their 64-bit integers (check_environment's error)."""
    value = os.environ.get(name)
    if value is None or not _WHOLE_NUMBER.fullmatch(value) or int(value) >= 2**63:
        return None
    return int(value)


#: Switches read as "0" (off) or "1" (on): anything else is an error, not a guess.
SWITCH_VARIABLES = ("BNLAB_TORCH_API",)  # the torch build (cpu_build_torch.compile_flags), on by default


def check_environment() -> None:
    """Raise ValueError naming the variable if one of BYTE_VARIABLES is set to anything but a whole
    number of bytes that fits the kernels' 64-bit integers, or one of SWITCH_VARIABLES to anything
    but 0 or 1."""
    for name in BYTE_VARIABLES:
        value = os.environ.get(name)
        if value is not None and env_bytes(name) is None:
            raise ValueError(f"{name}: expected a whole number of bytes such as 33554432, got {value!r}")
    for name in SWITCH_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip() not in ("0", "1"):
            raise ValueError(f"{name}: expected 0 (off) or 1 (on), got {value!r}")
