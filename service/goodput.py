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

import heapq
import math
from collections.abc import Callable, Sequence
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


# Slack, in seconds, where a record's start is bounded below by (a time - the longest record):
# `end - start` and `time - longest` round differently on epoch-sized floats (an ulp is about
# 2.4e-7 s); a record found too many is dropped by the exact test on its end that follows.
ROUNDING_SLACK_S = 1e-6


class SpanIndex:
    """Blocking spans sorted by start, for summing their overlap with many steps at once."""

    def __init__(self, spans: list[SpanIn]) -> None:
        self.spans = sorted(spans, key=lambda s: s.start)

    def overlaps(self, intervals: Sequence[tuple[float, float]]) -> list[float]:
        """The seconds each (start, end) shares with the spans (summed, nested spans each
        counted), in one sweep: intervals and spans both in start order, with the spans that
        may still reach the next interval in a heap by end. Each sum adds its spans in start
        order, so the floats do not depend on the order of the intervals."""
        out = [0.0] * len(intervals)
        spans, n, j = self.spans, len(self.spans), 0
        live: list[tuple[float, int]] = []  # (end, index into spans)
        for i in sorted(range(len(intervals)), key=lambda i: intervals[i][0]):
            start, end = intervals[i]
            while j < n and spans[j].start < end:
                heapq.heappush(live, (spans[j].end, j))
                j += 1
            while live and live[0][0] <= start:
                heapq.heappop(live)
            if live:
                hits = sorted(k for _, k in live) if len(live) > 1 else [live[0][1]]
                out[i] = sum(_overlap(start, end, spans[k].start, spans[k].end) for k in hits)
        return out


class AttemptSplit(NamedTuple):
    """One attempt's steps cut at a step number: busy time (step time minus the blocking
    spans inside) and step count of the steps at or before the cut, and after it."""

    busy_upto: float
    busy_after: float
    steps_after: int


class RankTotals(NamedTuple):
    """What the accounting needs about one rank, in aggregate: from raw records
    (`rank_totals`) or from rollups kept at ingest (service/repository_rollups.py)."""

    rank: int
    attempts: list[AttemptIn]  # the rank's attempt rows
    extents: dict[int, tuple[float, float]]  # attempt -> (first start, last end) of its records
    blocking_s: dict[str, float]  # blocking span seconds by category
    hook_s: float
    steps: int
    tokens: int
    split: Callable[[int, float], AttemptSplit]  # (attempt, committed up to step) -> split


def rank_totals(
    rank: int, attempts: list[AttemptIn], steps: list[StepIn], spans: list[SpanIn]
) -> RankTotals:
    """The aggregates of one rank's raw records."""
    extents: dict[int, tuple[float, float]] = {}
    records: list[StepIn | SpanIn] = [*steps, *spans]
    for r in records:
        lo, hi = extents.get(r.attempt, (math.inf, -math.inf))
        extents[r.attempt] = (min(lo, r.start), max(hi, r.end))
    blocking = [s for s in spans if not s.overlapped]
    badput: dict[str, float] = {}
    for span in blocking:
        badput[span.category] = badput.get(span.category, 0.0) + (span.end - span.start)
    blocked = SpanIndex(blocking).overlaps([(s.start, s.end) for s in steps])
    by_attempt: dict[int, list[tuple[int, float]]] = {}
    for s, x in zip(steps, blocked, strict=True):
        by_attempt.setdefault(s.attempt, []).append((s.step, (s.end - s.start) - x))

    def split(attempt: int, upto: float) -> AttemptSplit:
        mine = by_attempt.get(attempt, [])
        after = [b for n, b in mine if n > upto]
        return AttemptSplit(sum(b for n, b in mine if n <= upto), sum(after), len(after))

    return RankTotals(
        rank=rank,
        attempts=attempts,
        extents=extents,
        blocking_s=badput,
        hook_s=sum(s.hook_overhead_s or 0.0 for s in steps),
        steps=len(steps),
        tokens=sum(s.tokens for s in steps),
        split=split,
    )


def committed_upto(a: AttemptIn, is_last: bool, checkpoints: list[CheckpointIn]) -> float:
    """Steps <= this are committed: all of a completed or still-running attempt, else up to
    its last successful checkpoint (-1: none)."""
    if a.status == "completed" or (a.status is None and is_last):
        return math.inf
    return max((c.step for c in checkpoints if c.attempt == a.attempt and c.ok), default=-1)


def ordered_attempts(t: RankTotals) -> list[AttemptIn]:
    """The rank's attempts by number; one with records but no attempt_start row is inferred,
    and an attempt starts no later than its first record."""
    by_attempt: dict[int, AttemptIn] = {a.attempt: a for a in t.attempts}
    for attempt, (first, _) in t.extents.items():
        a = by_attempt.get(attempt) or AttemptIn(attempt, t.rank, first, None, None)
        by_attempt[attempt] = a._replace(start=min(a.start, first))
    return [by_attempt[k] for k in sorted(by_attempt)]


def attempt_end(a: AttemptIn, t: RankTotals) -> tuple[float, float]:
    """(last record, end) of an attempt: its end record, else its last record or heartbeat."""
    last = max(a.start, t.extents.get(a.attempt, (math.inf, -math.inf))[1])
    return last, a.end if a.end is not None else max(last, a.last_seen or last)


def account(t: RankTotals, checkpoints: list[CheckpointIn] | None = None) -> RankGoodput:
    """Account one rank's wall time from its aggregates."""
    ordered = ordered_attempts(t)
    badput = _empty_badput()
    for category, seconds in t.blocking_s.items():
        badput[category] = badput.get(category, 0.0) + seconds
    badput["observability"] += t.hook_s
    goodput = 0.0
    prev_end: float | None = None
    start = ordered[0].start if ordered else 0.0
    end = start
    for i, a in enumerate(ordered):
        last, a_end = attempt_end(a, t)
        if prev_end is not None and a.start > prev_end:
            badput["infra_recovery"] += a.start - prev_end
        upto = committed_upto(a, i == len(ordered) - 1, checkpoints or [])
        split = t.split(a.attempt, upto)
        goodput += split.busy_upto
        badput["wasted_progress"] += split.busy_after
        if upto != math.inf:
            badput["wasted_progress"] += max(0.0, a_end - last)  # the partial step
        prev_end = a_end
        end = max(end, a_end)
    total = end - start
    return RankGoodput(
        rank=t.rank,
        start=start,
        end=end,
        total_s=total,
        goodput_s=goodput,
        badput_s=badput,
        other_s=total - goodput - sum(badput.values()),
        steps=t.steps,
        tokens=t.tokens,
    )


def rank_goodput(
    rank: int,
    attempts: list[AttemptIn],
    steps: list[StepIn],
    spans: list[SpanIn],
    checkpoints: list[CheckpointIn] | None = None,
) -> RankGoodput:
    """Account one rank's wall time; attempts without an attempt_start row are inferred."""
    return account(rank_totals(rank, attempts, steps, spans), checkpoints)


def slowest(per_rank: list[RankGoodput]) -> RunGoodput:
    """The run's figures: its slowest rank's (largest total; on a tie, least goodput)."""
    if not per_rank:
        return RunGoodput(0.0, 0.0, None, _empty_badput(), 0.0, None, 0, 0, [])
    worst = max(per_rank, key=lambda g: (g.total_s, -g.goodput_s))
    return RunGoodput(
        total_s=worst.total_s,
        goodput_s=worst.goodput_s,
        goodput_fraction=worst.goodput_fraction,
        badput_s=dict(worst.badput_s),
        other_s=worst.other_s,
        rank=worst.rank,
        steps=worst.steps,
        tokens=worst.tokens,
        ranks=per_rank,
    )


def run_goodput(inputs: GoodputInputs) -> RunGoodput:
    """Account every rank; the run takes its slowest rank's figures."""
    ranks = sorted(
        {a.rank for a in inputs.attempts}
        | {s.rank for s in inputs.steps}
        | {s.rank for s in inputs.spans}
    )
    return slowest(
        [
            rank_goodput(
                r,
                [a for a in inputs.attempts if a.rank == r],
                [s for s in inputs.steps if s.rank == r],
                [s for s in inputs.spans if s.rank == r],
                inputs.checkpoints,
            )
            for r in ranks
        ]
    )
