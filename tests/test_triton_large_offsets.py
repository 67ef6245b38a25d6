"""The Triton kernels' offsets in int64 where one sample holds 2**31 values or more.

Elsewhere the kernels widen before multiplying (c.to(tl.int64) * L); three spots multiplied in
int32: the statistics merge read channel c's shift K = x[0, c, 0] at c·L, and the centred
gradient kernels (grad_ncl_kernel, grad_input_merged_kernel) computed centre_shift's stride C·L
and total N·L (the forty-ninth session's audit, by Triton's interpreter: the wrapped offsets gave
channel 2 the mean -7 instead of 7, and every channel a shift of 0 instead of 8-11); the two now
take them from the host, as grad_merge_kernel did. Checked on a few values written into
tensors of 2**31 and more elements that are allocated but never touched (the pages stay
virtual: 6-8 GiB of address space, a few KiB of memory), in a process of its own
(tests/triton_offset_checks.py): a wrong offset reads memory that is not mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_large_inputs_are_addressed_in_int64():
    script = Path(__file__).with_name("triton_offset_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"the checks' process ended with {done.returncode}: {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"no 8 GiB of address space here: {result['skip']}")
    assert result == {"merged_means": [5.0, 6.0, 7.0], "centred_partial_sums": [0.0, 0.0, 0.0, 0.0]}
