from __future__ import annotations

import pytest

from service.downsample import minmax_downsample


def test_everything_is_kept_when_it_fits() -> None:
    assert minmax_downsample(list(range(10)), 10, float) == list(range(10))


def test_result_respects_the_limit_and_keeps_order() -> None:
    pts = list(range(1000))
    out = minmax_downsample(pts, 100, lambda v: float(v % 7))
    assert len(out) <= 100
    assert out == sorted(out)


def test_a_single_spike_survives_downsampling() -> None:
    values = [1.0] * 10_000
    values[4321] = 50.0
    values[8765] = 0.01
    out = minmax_downsample(list(range(10_000)), 50, lambda i: values[i])
    assert 4321 in out and 8765 in out


def test_too_few_points_asked_is_an_error_naming_max_points() -> None:
    with pytest.raises(ValueError, match="max_points"):
        minmax_downsample([1, 2, 3], 1, float)
