"""Goodput accounting: a pure function of stored records (see ARCHITECTURE.md).

Per rank, over the window from its first attempt's start to its last attempt's end (or the
last time it was seen):

  goodput        step time of committed steps, minus blocking badput spans inside them
  badput[cat]    blocking spans of each category; `wasted_progress` is the step time of a
                 failed attempt (no checkpoint records yet, so none of its steps is committed);
                 `infra_recovery` is the gap between an attempt's end and the next one's start
  other          total - goodput - sum(badput), unclamped: overlapping spans show up negative

so goodput + sum(badput) + other == total by construction. The run's figures are those of its
slowest rank (largest total; on a tie, least goodput); every rank stays listed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

from trainer_hooks.records import BADPUT_CATEGORIES


class AttemptIn(NamedTuple):
    attempt: int
    rank: int
    start: float
    end: float | None
    status: str | None


class StepIn(NamedTuple):
    attempt: int
    rank: int
    step: int
    start: float
    end: float
    tokens: int
    loss: float | None


class SpanIn(NamedTuple):
    attempt: int
    rank: int
    category: str
    start: float
    end: float
    overlapped: bool


@dataclass
class GoodputInputs:
    attempts: list[AttemptIn]
    steps: list[StepIn]
    spans: list[SpanIn]


@dataclass
class RankGoodput:
    rank: int
    start: float
    end: float
    total_s: float
    goodput_s: float
    badput_s: dict[str, float]
    other_s: float
    steps: int
    tokens: int

    @property
    def goodput_fraction(self) -> float | None:
        return self.goodput_s / self.total_s if self.total_s > 0 else None


@dataclass
class RunGoodput:
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float]
    other_s: float
    rank: int | None
    steps: int
    tokens: int
    ranks: list[RankGoodput] = field(default_factory=list)


def _empty_badput() -> dict[str, float]:
    return {c: 0.0 for c in BADPUT_CATEGORIES}


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


class _SpanIndex:
    """Blocking spans sorted by start, for summing their overlap with a step quickly."""

    def __init__(self, spans: list[SpanIn]) -> None:
        self.spans = sorted(spans, key=lambda s: s.start)
        self.starts = [s.start for s in self.spans]
        self.longest = max((s.end - s.start for s in self.spans), default=0.0)

    def overlap(self, start: float, end: float) -> float:
        lo = bisect.bisect_left(self.starts, start - self.longest)
        hi = bisect.bisect_left(self.starts, end)
        return sum(_overlap(start, end, s.start, s.end) for s in self.spans[lo:hi])


def _attempt_end(a: AttemptIn, steps: list[StepIn], spans: list[SpanIn]) -> float:
    if a.end is not None:
        return a.end
    seen = [s.end for s in steps] + [s.end for s in spans]
    return max([a.start, *seen])


def rank_goodput(
    rank: int, attempts: list[AttemptIn], steps: list[StepIn], spans: list[SpanIn]
) -> RankGoodput:
    """Account one rank's wall time; attempts without an attempt_start row are inferred."""
    starts = [(s.attempt, s.start) for s in steps] + [(s.attempt, s.start) for s in spans]
    by_attempt: dict[int, AttemptIn] = {a.attempt: a for a in attempts}
    for attempt, start in starts:
        a = by_attempt.get(attempt) or AttemptIn(attempt, rank, start, None, None)
        by_attempt[attempt] = a._replace(start=min(a.start, start))
    ordered = [by_attempt[k] for k in sorted(by_attempt)]
    blocking = [s for s in spans if not s.overlapped]
    index = _SpanIndex(blocking)
    badput = _empty_badput()
    for s in blocking:
        badput[s.category] = badput.get(s.category, 0.0) + (s.end - s.start)
    goodput = 0.0
    prev_end: float | None = None
    end = ordered[0].start if ordered else 0.0
    for a in ordered:
        a_steps = [s for s in steps if s.attempt == a.attempt]
        a_end = _attempt_end(a, a_steps, [s for s in spans if s.attempt == a.attempt])
        if prev_end is not None and a.start > prev_end:
            badput["infra_recovery"] += a.start - prev_end
        step_time = sum((s.end - s.start) - index.overlap(s.start, s.end) for s in a_steps)
        if a.status == "failed":
            badput["wasted_progress"] += step_time
        else:
            goodput += step_time
        prev_end = a_end
        end = max(end, a_end)
    start = ordered[0].start if ordered else 0.0
    total = end - start
    return RankGoodput(
        rank=rank,
        start=start,
        end=end,
        total_s=total,
        goodput_s=goodput,
        badput_s=badput,
        other_s=total - goodput - sum(badput.values()),
        steps=len(steps),
        tokens=sum(s.tokens for s in steps),
    )


def run_goodput(inputs: GoodputInputs) -> RunGoodput:
    """Account every rank; the run takes its slowest rank's figures."""
    ranks = sorted(
        {a.rank for a in inputs.attempts}
        | {s.rank for s in inputs.steps}
        | {s.rank for s in inputs.spans}
    )
    per_rank = [
        rank_goodput(
            r,
            [a for a in inputs.attempts if a.rank == r],
            [s for s in inputs.steps if s.rank == r],
            [s for s in inputs.spans if s.rank == r],
        )
        for r in ranks
    ]
    if not per_rank:
        return RunGoodput(0.0, 0.0, None, _empty_badput(), 0.0, None, 0, 0, [])
    slowest = max(per_rank, key=lambda g: (g.total_s, -g.goodput_s))
    return RunGoodput(
        total_s=slowest.total_s,
        goodput_s=slowest.goodput_s,
        goodput_fraction=slowest.goodput_fraction,
        badput_s=dict(slowest.badput_s),
        other_s=slowest.other_s,
        rank=slowest.rank,
        steps=slowest.steps,
        tokens=slowest.tokens,
        ranks=per_rank,
    )
