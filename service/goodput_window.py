"""Goodput over a time window: the same accounting, on records cut to the window.

This is the definition. Every attempt gets an explicit end first (its end record, else its
last record or heartbeat, as the calculator infers), then every interval is clipped to
[start, end] and what lies outside is dropped. A step's measured hook overhead counts in the
window its step ends in. The invariant holds per window: goodput + badput + other == the
window's share of the run. The service reads windows through the rollups and has the database
sum them (repository_windows.py); tests check that against this on the raw records.
"""

from __future__ import annotations

import math

from service.goodput import AttemptIn, GoodputInputs, RunGoodput, SpanIn, StepIn

MAX_WINDOWS = 10_000


def _attempt_ends(inputs: GoodputInputs) -> list[AttemptIn]:
    last: dict[tuple[int, int], float] = {}
    records: list[StepIn | SpanIn] = [*inputs.steps, *inputs.spans]
    for r in records:
        key = (r.attempt, r.rank)
        if r.end > last.get(key, -math.inf):
            last[key] = r.end
    out = []
    for a in inputs.attempts:
        if a.end is None:
            mine = last.get((a.attempt, a.rank), a.start)
            a = a._replace(end=max(a.start, a.last_seen or a.start, mine))
        out.append(a)
    return out


def clip_inputs(inputs: GoodputInputs, start: float, end: float) -> GoodputInputs:
    """The records as seen through [start, end]."""
    if not end > start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    attempts = [
        a._replace(start=max(a.start, start), end=min(a.end, end))
        for a in _attempt_ends(inputs)
        if a.end is not None and a.end > start and a.start < end
    ]
    steps = [
        s._replace(
            start=max(s.start, start),
            end=min(s.end, end),
            hook_overhead_s=s.hook_overhead_s if start < s.end <= end else None,
        )
        for s in inputs.steps
        if s.end > start and s.start < end
    ]
    spans = [
        s._replace(start=max(s.start, start), end=min(s.end, end))
        for s in inputs.spans
        if s.end > start and s.start < end
    ]
    return GoodputInputs(attempts, steps, spans, inputs.checkpoints)


def run_extent(g: RunGoodput) -> tuple[float, float] | None:
    """First start and last end over every rank of an accounted run, or None for a run with
    no records."""
    if not g.ranks:
        return None
    return min(r.start for r in g.ranks), max(r.end for r in g.ranks)


def rolling(
    extent: tuple[float, float] | None, window_s: float, step_s: float
) -> list[tuple[float, float]]:
    """Window bounds from the run's start, every step_s, each window_s long."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
    if not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"step_s must be a positive number of seconds, got {step_s}")
    if extent is None:
        return []
    first, last = extent
    count = max(1, math.ceil((last - first - window_s) / step_s) + 1) if last > first else 1
    if count > MAX_WINDOWS:
        raise ValueError(f"window_s/step_s give {count} windows; at most {MAX_WINDOWS}")
    bounds = [(first + i * step_s, first + i * step_s + window_s) for i in range(count)]
    if any(b <= a for a, b in bounds):  # e.g. 1e-9 s on an epoch timestamp
        raise ValueError(f"window_s={window_s} is below the resolution of the run's timestamps")
    return bounds
