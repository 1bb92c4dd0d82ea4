import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import stats

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


def test_summary_of_known_samples():
    s = stats.summarize([4, 1, 3, 2, 10])
    assert (s.n, s.median, s.min, s.max) == (5, 3, 1, 10)
    assert s.p99 == 10                          # nearest rank: the maximum below 100 samples
    assert s.stdev == pytest.approx(math.sqrt(12.5))


def test_even_count_median_is_the_mean_of_the_middle_two():
    assert stats.summarize([1, 2, 3, 4]).median == 2.5


def test_nearest_rank_percentile():
    samples = list(range(1, 201))              # 1..200
    assert stats.percentile(samples, 99) == 198
    assert stats.percentile(samples, 50) == 100
    assert stats.percentile(samples, 100) == 200


def test_single_sample_has_zero_stdev():
    assert stats.summarize([7]).stdev == 0.0


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_bad_samples_are_a_typed_error(bad):
    with pytest.raises(stats.StatsError):
        stats.summarize(bad)


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_outside_range_is_refused(q):
    with pytest.raises(stats.StatsError):
        stats.percentile([1, 2], q)


@given(st.lists(finite, min_size=1, max_size=300))
def test_summary_is_ordered(samples):
    s = stats.summarize(samples)
    assert s.min <= s.median <= s.max
    assert s.median <= s.p99 <= s.max or math.isclose(s.median, s.p99)
    assert s.p99 in samples
    assert s.stdev >= 0


def test_ratio_is_subject_over_peer_and_none_for_zero_peer():
    assert stats.ratio(30, 20) == 1.5
    assert stats.ratio(5, 0) is None
    assert stats.format_ratio(1.5) == "1.50x"
    assert stats.format_ratio(None) == "n/a"
