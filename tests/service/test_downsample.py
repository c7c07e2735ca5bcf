"""The downsampling definition on plain data (service/downsample.py)."""

from __future__ import annotations

import pytest

from service.calc.downsample import bucket_plan, minmax_keys, pick

LEVELS = (64, 4096)


def test_every_row_comes_back_when_they_fit() -> None:
    rows = [(s, 0, float(s)) for s in range(10)]
    assert minmax_keys(rows, 0, 9, 10, LEVELS) == [(s, 0) for s in range(10)]


def test_buckets_never_exceed_half_the_points_and_are_whole_blocks() -> None:
    for lo, hi, points in [(0, 999_999, 320), (5, 70_000, 320), (3, 10_000, 2000), (0, 9, 2)]:
        width, level = bucket_plan(lo, hi, points, LEVELS)
        assert width % level == 0 and level in (1, *LEVELS)
        assert hi // width - lo // width + 1 <= points // 2


def test_a_spike_in_each_direction_survives() -> None:
    values = [1.0] * 10_000
    values[1234], values[8765] = 50.0, -3.0
    rows = [(s, 0, values[s]) for s in range(10_000)]
    kept = minmax_keys(rows, 0, 9999, 50, LEVELS)
    assert len(kept) <= 50 and (1234, 0) in kept and (8765, 0) in kept


def test_ties_keep_the_lowest_step_then_attempt() -> None:
    assert pick([(0, 1.0, 5, 1), (0, 1.0, 5, 0), (0, 1.0, 7, 0)]) == [(5, 0)]


def test_too_few_points_asked_is_an_error_naming_max_points() -> None:
    with pytest.raises(ValueError, match="max_points"):
        bucket_plan(0, 10, 1, LEVELS)
