"""Server-side downsampling that keeps spikes: per bucket, the points holding the minimum and
the maximum of the value, in their original order."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def minmax_downsample(points: Sequence[T], max_points: int, value: Callable[[T], float]) -> list[T]:
    """Return at most `max_points` of `points` (every one when they fit)."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    n = len(points)
    if n <= max_points:
        return list(points)
    size = math.ceil(n / (max_points // 2))
    out: list[T] = []
    for lo in range(0, n, size):
        bucket = range(lo, min(n, lo + size))
        i_min = min(bucket, key=lambda i: value(points[i]))
        i_max = max(bucket, key=lambda i: value(points[i]))
        out.extend(points[i] for i in sorted({i_min, i_max}))
    return out
