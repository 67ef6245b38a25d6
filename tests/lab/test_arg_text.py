"""bnlab.lab.arg_text.parse_shape: the one reader of shapes written on a command line (the lab's
run speed --shapes, the benchmark scripts' --shape/--shapes)."""

import pytest

from bnlab.lab.arg_text import parse_shape


@pytest.mark.parametrize("text,rank,shape", [("256,100", None, (256, 100)), ("8,16,4,28,28", None, (8, 16, 4, 28, 28)),
                                             ("64, 128,28 ,28", 4, (64, 128, 28, 28)), ("2,3,5", 3, (2, 3, 5))])
def test_parses_sizes(text, rank, shape):
    assert parse_shape(text, rank) == shape


@pytest.mark.parametrize("text,rank,expected", [
    ("8", None, "expected 2 to 5 comma-separated positive sizes (N,C[,L], N,C,H,W or N,C,D,H,W) such as "
                "64,128,28,28, got '8'"),
    ("1,2,3,4,5,6", None, "expected 2 to 5"),
    ("8,0", None, "expected 2 to 5"),
    ("8,-1,3", None, "expected 2 to 5"),
    ("4,6,x", None, "expected 2 to 5"),
    ("", None, "expected 2 to 5"),
    ("16,5", 4, "expected 4 comma-separated positive sizes (N,C,H,W) such as 64,128,28,28, got '16,5'"),
    ("16,5,3", 2, "expected 2 comma-separated positive sizes (N,C) such as 256,100, got '16,5,3'"),
])
def test_refuses_other_text_saying_what_was_expected_and_given(text, rank, expected):
    with pytest.raises(ValueError) as err:
        parse_shape(text, rank)
    assert expected in str(err.value)


def test_refuses_a_rank_it_cannot_read():
    with pytest.raises(ValueError, match=r"rank: expected one of \[2, 3, 4, 5\] or None, got 6"):
        parse_shape("1,2,3,4,5,6", rank=6)
