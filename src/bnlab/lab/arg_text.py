"""Values written on a command line, read alike by the lab's ``bnlab`` command and the benchmark
scripts: shapes, "64,128,28,28" -> (64, 128, 28, 28) (``run speed --shapes``, the scripts'
``--shape``/``--shapes``), and counts (``selfcheck --steps``, the scripts' ``--threads``). No torch
import, so that the CLI's parser stays quick to load."""

from __future__ import annotations

import argparse

__all__ = ["parse_shape", "positive_int", "seed_int"]

_FORMS = {2: "N,C", 3: "N,C,L", 4: "N,C,H,W", 5: "N,C,D,H,W"}
_EXAMPLES = {2: "256,100", 3: "32,16,100", 4: "64,128,28,28", 5: "8,16,4,28,28"}


def parse_shape(text: str, rank: int | None = None) -> tuple[int, ...]:
    """The sizes of ``text``, comma-separated positive integers: 2 to 5 of them (N,C[,L], N,C,H,W or
    N,C,D,H,W), or exactly ``rank``. Raises ValueError saying what was expected and what was given
    (the caller prefixes the option's name)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if rank is not None and rank not in _FORMS:
        raise ValueError(f"rank: expected one of {list(_FORMS)} or None, got {rank!r}")
    ranks = (rank,) if rank is not None else tuple(_FORMS)
    if len(shape) not in ranks or min(shape) < 1:
        if rank is not None:
            wanted = f"{rank} comma-separated positive sizes ({_FORMS[rank]}) such as {_EXAMPLES[rank]}"
        else:
            wanted = "2 to 5 comma-separated positive sizes (N,C[,L], N,C,H,W or N,C,D,H,W) such as 64,128,28,28"
        raise ValueError(f"expected {wanted}, got {text!r}")
    return shape


def positive_int(text: str) -> int:
    """An argparse ``type=`` for a count of at least 1: argparse turns the error into "argument
    --steps: expected a positive integer, got '0'"."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """An argparse ``type=`` for a random seed torch's generators take: 0 to 2**64 - 1 (beyond,
    torch's overflow error named no option)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1, got {text!r}")
    return value
