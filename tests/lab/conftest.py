"""Fixtures for the lab's tests: one torch thread, a scratch working directory, and the allocator
setting that `bnlab run` makes undone."""

from __future__ import annotations

import os

import pytest
import torch

from bnlab.lab import allocator


@pytest.fixture(autouse=True)
def one_thread_in_scratch_dir(tmp_path, monkeypatch):
    """Run each lab test with one torch thread in an empty working directory.

    The lab's tensors are small, and on a machine whose cores are busy with other jobs two
    OpenMP threads can wait on each other for milliseconds per operation; one thread keeps the
    quick runs quick everywhere. The scratch directory keeps runs/ out of the checkout.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def allocator_setting_undone():
    """Take back what `bnlab run`, called in this process by the CLI tests, did to the allocator's
    settings: the MALLOC_* variables it put in the environment (which every later subprocess of
    the suite would inherit) and its remembered answer. glibc's thresholds set by mallopt stay
    raised for the rest of the pytest process: there is no call that restores glibc's dynamic
    default, and they change no result, only how often freed memory goes back to the system."""
    saved = {name: os.environ.get(name) for name in allocator._ENV}
    answers = list(allocator._done)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    allocator._done[:] = answers
