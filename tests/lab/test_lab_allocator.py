"""bnlab.lab.allocator: `bnlab run` keeps freed memory in glibc's heap, unless the user chose.

Each case runs in a fresh process (the setting is process-wide and read at glibc's start) and
counts the minor page faults of each of ten cycles that allocate, write and free four 8 MiB
tensors: with glibc's defaults such tensors often come back from the system as fresh pages, which
fault in (not asserted: glibc's dynamic thresholds decide, and some processes fault in none).
With the setting the heap reaches its size in the first cycles and then keeps it; in about one
process in five that took one cycle more than the warm-up (6,144 faults in the first measured
cycle, none after), so the test takes the median cycle. A fresh anonymous mapping, written page
by page, shows that the counter counts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, resource, torch
from bnlab.lab import allocator
answer = allocator.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():
    tensors = [torch.empty(2 << 20).fill_(1.0) for _ in range(4)]  # four 8 MiB tensors, written
    del tensors
for _ in range(3):
    cycle()
cycle_faults = []
for _ in range(10):
    before = faults()
    cycle()
    cycle_faults.append(faults() - before)
import mmap  # the counter's control: a fresh anonymous mapping faults every page it writes
region = mmap.mmap(-1, 8 << 20)
before = faults()
for at in range(0, 8 << 20, 4096):
    region[at] = 1
print(json.dumps({"answer": answer, "again": allocator.keep_freed_memory(), "setting": allocator.setting(),
                  "faults": cycle_faults, "control_faults": faults() - before,
                  "env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_kept_and_the_processes_started_later_inherit_it():
    got = _probe()
    assert "glibc keeps freed memory" in got["answer"] and "32 MiB" in got["answer"], got
    assert got["again"] == got["answer"] == got["setting"]
    assert statistics.median(got["faults"]) <= 16 and got["control_faults"] >= 1000, got  # pages stay mapped
    assert got["env"] == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def test_a_users_own_setting_is_left_alone_and_reported():
    got = _probe(MALLOC_MMAP_THRESHOLD_="65536")
    assert got["answer"] == "glibc as the environment sets it (MALLOC_MMAP_THRESHOLD_=65536)", got
    assert got["answer"] == got["again"] == got["setting"]
    assert got["env"] == {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": None}
