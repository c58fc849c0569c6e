"""The benchmarks' bootstrap interval for a median of per-round ratios: brackets it, narrows with more rounds."""
import random
import statistics

import pytest

common = pytest.importorskip("benchmarks.common")


def test_interval_brackets_the_median_and_narrows_with_more_rounds():
    rng = random.Random(1)
    few = [1.5 + rng.gauss(0, 0.1) for _ in range(10)]
    many = [1.5 + rng.gauss(0, 0.1) for _ in range(400)]
    lo, hi = common.median_interval(few)
    assert lo <= statistics.median(few) <= hi and lo < hi
    lo_many, hi_many = common.median_interval(many)
    assert lo_many <= 1.5 <= hi_many
    assert hi_many - lo_many < (hi - lo) / 2


def test_interval_is_reproducible_degenerate_for_constant_values_and_needs_two_values():
    values = [1.2, 1.7, 1.4, 1.5, 1.3]
    assert common.median_interval(values) == common.median_interval(values)
    assert common.median_interval([1.5] * 7) == (1.5, 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        common.median_interval([1.5])
