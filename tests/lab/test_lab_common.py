"""The experiments' shared helpers (bnlab.lab.experiments._common) that reports rest on."""

from __future__ import annotations

import math

from bnlab.lab.experiments._common import data_words, decades, learning_band


def test_learning_band_is_the_longest_run_of_passing_scales():
    xs = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    # 0.25 fails between passing scales: the band must not stretch over it (the audit's finding)
    assert learning_band(xs, [0.95, 0.2, 0.93, 0.94, 0.91, math.nan], 0.9) == (0.0625, 0.25)
    assert learning_band(xs, [0.95, 0.93, 0.1, 0.92, 0.94, 0.1], 0.9) == (0.5, 1.0)  # ties: the first run
    assert learning_band(xs, [0.1] * 6, 0.9) is None
    assert decades(learning_band(xs, [0.9] * 6, 0.9)) == math.log10(32)


def test_data_words_name_the_bundled_sizes_or_the_folder():
    assert data_words({"data_dir": None}) == ("the 4,000 training images", "the 1,000 test images")
    assert data_words({"data_dir": "/data/mnist"}) == ("the training images in /data/mnist", "its test images")
