"""Downsampling that keeps spikes, defined on plain data: a series over step numbers [lo, hi]
is cut into aligned buckets of W step numbers ([k * W, (k + 1) * W)), at most max_points / 2
of them, and each bucket keeps its row with the lowest and its row with the highest value
(ties: the lowest step, then the lowest attempt). W is a multiple of the largest rollup level
not above it, so that a bucket is made of whole blocks and the rollups
(service/store/rollups/) give the same answer as the rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Key = tuple[int, int]  # (step, attempt)


def bucket_plan(lo: int, hi: int, max_points: int, levels: Sequence[int]) -> tuple[int, int]:
    """(bucket width W, the block level it is a multiple of; 1 for none)."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    buckets = max_points // 2
    # The smallest W for which [lo, hi] meets at most `buckets` aligned buckets.
    width = hi + 1 if buckets <= 1 else (hi - lo) // (buckets - 1) + 1
    level = max((lv for lv in levels if lv <= width), default=1)
    return -(-width // level) * level, level


def pick(candidates: Iterable[tuple[int, float, int, int]]) -> list[Key]:
    """From (bucket, value, step, attempt) candidates, the (step, attempt) keys kept: per
    bucket the lowest and the highest value, sorted by step then attempt."""
    lows: dict[int, tuple[float, int, int]] = {}
    highs: dict[int, tuple[float, int, int]] = {}
    for bucket, value, step, attempt in candidates:
        low = (value, step, attempt)
        if bucket not in lows or low < lows[bucket]:
            lows[bucket] = low
        high = (value, -step, -attempt)
        if bucket not in highs or high > highs[bucket]:
            highs[bucket] = high
    keys = {(step, attempt) for _, step, attempt in lows.values()}
    keys |= {(-step, -attempt) for _, step, attempt in highs.values()}
    return sorted(keys)


def minmax_keys(
    rows: Sequence[tuple[int, int, float]],
    lo: int,
    hi: int,
    max_points: int,
    levels: Sequence[int],
) -> list[Key]:
    """The reference on raw (step, attempt, value) rows of [lo, hi]: every key when they fit
    in max_points, else the kept ones."""
    inside = [r for r in rows if lo <= r[0] <= hi]
    if len(inside) <= max_points:
        return sorted((s, a) for s, a, _ in inside)
    width, _ = bucket_plan(lo, hi, max_points, levels)
    return pick((s // width, v, s, a) for s, a, v in inside)
