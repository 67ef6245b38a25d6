"""Fixtures for the lab's tests: one torch thread, and a scratch working directory."""

from __future__ import annotations

import pytest
import torch


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
