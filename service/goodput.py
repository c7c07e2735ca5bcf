"""Goodput accounting: a pure function of stored records (see ARCHITECTURE.md).

Per rank, over the window from its first attempt's start to its last attempt's end (or the
last time it was seen):

  goodput        step time of committed steps, minus blocking badput spans inside them. A
                 step is committed when its attempt completed, or when a checkpoint of its
                 attempt (from any rank) covering it succeeded; the steps of the attempt still
                 running (the last one, with no end) are counted as goodput provisionally.
  badput[cat]    blocking spans of each category, plus two derived ones:
                 `wasted_progress`: the uncommitted steps of an attempt that failed (or that
                 stopped without an end record and was followed by another), plus its tail from
                 the last record to its end (the partial step at the crash);
                 `infra_recovery`: the gap between an attempt's end and the next one's start;
                 `observability`: the hooks' own host time, which they measure and report
                 with each step (it lies between steps, so it comes out of `other`).
                 An attempt with no end record ends at its last heartbeat or record.
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
    last_seen: float | None = None
    cause: str | None = None


class CheckpointIn(NamedTuple):
    attempt: int
    step: int
    ok: bool


class StepIn(NamedTuple):
    attempt: int
    rank: int
    step: int
    start: float
    end: float
    tokens: int
    loss: float | None
    hook_overhead_s: float | None = None
    flops: int | None = None
    device_time_s: float | None = None


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
    checkpoints: list[CheckpointIn] = field(default_factory=list)


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


def _last_record(a: AttemptIn, steps: list[StepIn], spans: list[SpanIn]) -> float:
    return max([a.start, *(s.end for s in steps), *(s.end for s in spans)])


def _committed_upto(a: AttemptIn, is_last: bool, checkpoints: list[CheckpointIn]) -> float:
    """Steps <= this are committed: all of a completed or still-running attempt, else up to
    its last successful checkpoint (-1: none)."""
    if a.status == "completed" or (a.status is None and is_last):
        return float("inf")
    return max((c.step for c in checkpoints if c.attempt == a.attempt and c.ok), default=-1)


def rank_goodput(
    rank: int,
    attempts: list[AttemptIn],
    steps: list[StepIn],
    spans: list[SpanIn],
    checkpoints: list[CheckpointIn] | None = None,
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
    for span in blocking:
        badput[span.category] = badput.get(span.category, 0.0) + (span.end - span.start)
    badput["observability"] += sum(s.hook_overhead_s or 0.0 for s in steps)
    goodput = 0.0
    prev_end: float | None = None
    start = ordered[0].start if ordered else 0.0
    end = start
    for i, a in enumerate(ordered):
        a_steps = [s for s in steps if s.attempt == a.attempt]
        last = _last_record(a, a_steps, [s for s in spans if s.attempt == a.attempt])
        a_end = a.end if a.end is not None else max(last, a.last_seen or last)
        if prev_end is not None and a.start > prev_end:
            badput["infra_recovery"] += a.start - prev_end
        upto = _committed_upto(a, i == len(ordered) - 1, checkpoints or [])
        for s in a_steps:
            busy = (s.end - s.start) - index.overlap(s.start, s.end)
            if s.step <= upto:
                goodput += busy
            else:
                badput["wasted_progress"] += busy
        if upto != float("inf"):
            badput["wasted_progress"] += max(0.0, a_end - last)  # the partial step
        prev_end = a_end
        end = max(end, a_end)
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
            inputs.checkpoints,
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
