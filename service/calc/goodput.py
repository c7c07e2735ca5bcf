"""Goodput accounting: a pure function of stored records. The rules are docs/ACCOUNTING.md;
this module holds them as code, on data the store has already read (no SQL here).

Two phases, so that windows are cuts of one accounting:

1. `decide`: on the whole run, each rank's attempts get a start, an end, a last sign of life,
   a status shared by all ranks (failed on one rank: failed on all) and the step number up to
   which their steps are committed; `inferred_compile` fixes the first step's excess over the
   ideal step time as compile intervals.
2. `account`: one rank's parts within [lo, hi] (the whole run: -inf, inf), from those
   decisions and the sums the store made of the records cut to [lo, hi] (`RankParts`).

Per rank and window: goodput + sum(badput) + other == total, by construction.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from trainer_hooks.records import BADPUT_CATEGORIES

# Overlapping blocking spans: each second goes to the first of these that covers it, then to
# custom:<name> in name order (docs/ACCOUNTING.md, section 2).
PRECEDENCE: tuple[str, ...] = (
    "checkpoint_restore",
    "checkpoint_save",
    "startup",
    "compile",
    "eval",
    "data_stall",
    "profiling",
    "observability",
)
STALL_INTERVALS = 6  # heartbeat intervals of silence after which an open attempt is stalled
CHOICE_RESOLUTION_S = 1e-6  # totals and goodput are compared at this resolution
RESTARTED = "restarted (no end record)"
FAILED_STATUSES = ("failed", "stalled")


class AttemptIn(NamedTuple):
    """One rank's stored attempt row."""

    attempt: int
    rank: int
    start: float
    end: float | None
    status: str | None
    last_seen: float | None = None
    cause: str | None = None
    heartbeat_s: float | None = None


class CheckpointIn(NamedTuple):
    attempt: int
    step: int
    ok: bool
    rank: int | None = None
    time: float | None = None


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


class Interval(NamedTuple):
    start: float
    end: float


@dataclass
class GoodputInputs:
    """Every record the accounting reads, raw (the definition the stored sums are held to)."""

    attempts: list[AttemptIn]
    steps: list[StepIn]
    spans: list[SpanIn]
    checkpoints: list[CheckpointIn] = field(default_factory=list)
    excluded: list[Interval] = field(default_factory=list)


@dataclass(frozen=True)
class Decided:
    """One rank's attempt as the whole run decides it."""

    attempt: int
    rank: int
    start: float
    end: float
    progress: float  # the last record of progress: a step, span or checkpoint commit
    status: str  # completed, failed, stalled, running
    cause: str | None
    upto: float  # steps numbered <= upto are committed


class CompileCut(NamedTuple):
    """Seconds of an attempt rank's first step charged to compile (inferred)."""

    attempt: int
    rank: int
    step: int
    intervals: tuple[Interval, ...]


class AttemptSplit(NamedTuple):
    """One attempt rank's steps within a window: busy time (cut step time minus the blocked
    time inside) of the committed steps and of the others, and how many others."""

    busy_upto: float
    busy_after: float
    steps_after: int


@dataclass
class RankParts:
    """What the store summed of one rank's records cut to a window."""

    rank: int
    split: dict[int, AttemptSplit]  # attempt -> split at its decided `upto`
    blocking_s: dict[str, float]  # charged by precedence
    hook_s: float  # of the steps that end in the window
    steps: int
    tokens: int

    @classmethod
    def empty(cls, rank: int) -> RankParts:
        """A rank with no record in the window."""
        return cls(rank, {}, {}, 0.0, 0, 0)


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


def empty_badput() -> dict[str, float]:
    return {c: 0.0 for c in BADPUT_CATEGORIES}


def clip(a: float, b: float, lo: float, hi: float) -> float:
    """Seconds of [a, b] inside [lo, hi]."""
    return max(0.0, min(b, hi) - max(a, lo))


# Slack, in seconds, where a record's start is bounded below by (a time - the longest record):
# `end - start` and `time - longest` round differently on epoch-sized floats (an ulp is about
# 2.4e-7 s); a record found too many is dropped by the exact test on its end that follows.
ROUNDING_SLACK_S = 1e-6


def union_inside(a: float, b: float, spans: Iterable[tuple[float, float]]) -> float:
    """Seconds of [a, b] covered by at least one of the spans."""
    total, reach = 0.0, a
    for s, e in sorted(spans):
        s, e = max(s, reach), min(e, b)
        if e > s:
            total += e - s
            reach = e
    return total


class SpanIndex:
    """Blocking spans sorted by start, for measuring how much of many intervals they cover."""

    def __init__(self, spans: list[SpanIn]) -> None:
        self.spans = sorted(spans, key=lambda s: (s.start, s.end))

    def overlaps(self, intervals: Sequence[tuple[float, float]]) -> list[float]:
        """The seconds of each (start, end) covered by the spans (their union: a second
        covered twice counts once), in one sweep: intervals and spans both in start order,
        with the spans that may still reach the next interval in a heap by end."""
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
            if len(live) == 1:
                k = live[0][1]
                out[i] = clip(spans[k].start, spans[k].end, start, end)
            elif live:
                hits = sorted(live, key=lambda h: h[1])
                out[i] = union_inside(start, end, ((spans[k].start, spans[k].end) for _, k in hits))
        return out


def precedence(category: str) -> tuple[int, str]:
    try:
        return PRECEDENCE.index(category), ""
    except ValueError:
        return len(PRECEDENCE), category


def credited(spans: Sequence[SpanIn], lo: float, hi: float) -> list[float]:
    """Seconds of [lo, hi] credited to each blocking span of one rank (by position): each
    second to the covering span of highest category precedence, the earliest (by start, then
    attempt) among spans of that category. Overlapped spans are credited nothing."""
    events: list[tuple[float, int, int]] = []
    for j, s in enumerate(spans):
        a, b = max(s.start, lo), min(s.end, hi)
        if b > a and not s.overlapped:
            events += [(a, 1, j), (b, -1, j)]
    events.sort(key=lambda e: e[0])
    out = [0.0] * len(spans)
    live: set[int] = set()
    prev = -math.inf
    for t, delta, j in events:
        if live and t > prev:
            top = min(
                live,
                key=lambda k: (precedence(spans[k].category), spans[k].start, spans[k].attempt, k),
            )
            out[top] += t - prev
        if delta > 0:
            live.add(j)
        else:
            live.discard(j)
        prev = t
    return out


def charged(spans: Iterable[SpanIn], lo: float, hi: float) -> dict[str, float]:
    """Seconds of [lo, hi] charged to each category by blocking spans of one rank: each
    second to the covering span of highest precedence (`credited`, summed by category)."""
    mine = list(spans)
    out: dict[str, float] = {}
    for s, x in zip(mine, credited(mine, lo, hi), strict=True):
        if x:
            out[s.category] = out.get(s.category, 0.0) + x
    return out


def clash_correction(clashing: Iterable[SpanIn], lo: float, hi: float) -> dict[str, float]:
    """What to add to the plain sums of span durations (cut to [lo, hi]) so that they charge
    by precedence: for the spans that share time with another (the store flags them), their
    charged seconds minus their summed seconds, per category."""
    mine = [s for s in clashing if not s.overlapped]
    out = charged(mine, lo, hi)
    for s in mine:
        out[s.category] = out.get(s.category, 0.0) - clip(s.start, s.end, lo, hi)
    return out


def inferred_compile(
    start: float, end: float, blocking: Iterable[tuple[float, float]], ideal: float | None
) -> tuple[Interval, ...]:
    """The first `busy - ideal` unblocked seconds of a first step (docs/ACCOUNTING.md)."""
    if ideal is None:
        return ()
    spans = sorted((max(a, start), min(b, end)) for a, b in blocking if b > start and a < end)
    busy = (end - start) - union_inside(start, end, spans)
    excess = busy - ideal
    if not excess > 0:
        return ()
    out: list[Interval] = []
    t = start
    for a, b in [*spans, (end, end)]:
        if a > t:
            take = min(a - t, excess)
            out.append(Interval(t, t + take))
            excess -= take
            if excess <= 0:
                break
        t = max(t, b)
    return tuple(out)


def attempt_statuses(
    rows: Sequence[AttemptIn], numbers: Iterable[int], now: float
) -> dict[int, tuple[str, str | None]]:
    """(status, cause) of each attempt number, shared by all its ranks."""
    numbers = sorted(set(numbers) | {a.attempt for a in rows})
    newest = numbers[-1] if numbers else -1
    out: dict[int, tuple[str, str | None]] = {}
    for n in numbers:
        mine = sorted((a for a in rows if a.attempt == n), key=lambda a: a.rank)
        failed = [a for a in mine if a.status == "failed"]
        if failed:
            out[n] = ("failed", failed[0].cause)
        elif any(a.status == "completed" for a in mine):
            out[n] = ("completed", None)
        elif n < newest:
            out[n] = ("failed", RESTARTED)
        else:
            out[n] = _open_status(mine, now)
    return out


def _open_status(rows: Sequence[AttemptIn], now: float) -> tuple[str, str | None]:
    intervals = [a.heartbeat_s for a in rows if a.heartbeat_s]
    beats = [a.last_seen for a in rows if a.last_seen is not None]
    if intervals and beats:
        silent = now - max(beats)
        if silent > STALL_INTERVALS * max(intervals):
            return "stalled", f"stalled: no heartbeat for {silent:.0f} s"
    return "running", None


def decide(
    rows: Sequence[AttemptIn],
    life: dict[tuple[int, int], tuple[float, float]],
    saved: dict[int, int],
    now: float,
) -> dict[int, list[Decided]]:
    """Each rank's attempts, decided on the whole run. `life[attempt, rank]`: the earliest
    start and the latest end or time among its records of progress (steps, spans, checkpoint
    commits; heartbeats are in the attempt rows); `saved[attempt]`: its last successful
    checkpoint's step."""
    by_key = {(a.attempt, a.rank): a for a in rows}
    keys = sorted(set(by_key) | set(life))
    statuses = attempt_statuses(rows, (k[0] for k in keys), now)
    out: dict[int, list[Decided]] = {}
    for attempt, rank in keys:
        row = by_key.get((attempt, rank))
        first, last = life.get((attempt, rank), (math.inf, -math.inf))
        start = min(row.start, first) if row is not None else first
        seen = row.last_seen if row is not None and row.last_seen is not None else -math.inf
        progress = max(start, last)
        alive = max(progress, seen)  # the last sign of life
        end = row.end if row is not None and row.end is not None and row.end >= alive else alive
        status, cause = statuses[attempt]
        upto = saved.get(attempt, -1) if status in FAILED_STATUSES else math.inf
        out.setdefault(rank, []).append(
            Decided(attempt, rank, start, end, progress, status, cause, upto)
        )
    return out


def account(
    decided: Sequence[Decided],
    parts: RankParts,
    compile_cuts: Sequence[CompileCut] = (),
    lo: float = -math.inf,
    hi: float = math.inf,
) -> RankGoodput:
    """One rank's parts within [lo, hi] (docs/ACCOUNTING.md, section 2)."""
    ordered = sorted(decided, key=lambda d: d.attempt)
    badput = empty_badput()
    for category, seconds in parts.blocking_s.items():
        badput[category] = badput.get(category, 0.0) + seconds
    badput["observability"] += parts.hook_s
    goodput = 0.0
    start = min((d.start for d in ordered), default=0.0)
    end = max((d.end for d in ordered), default=start)
    prev_end: float | None = None
    for d in ordered:
        if prev_end is not None and d.start > prev_end:
            badput["infra_recovery"] += clip(prev_end, d.start, lo, hi)
        split = parts.split.get(d.attempt, AttemptSplit(0.0, 0.0, 0))
        goodput += split.busy_upto
        badput["wasted_progress"] += split.busy_after
        if d.status in FAILED_STATUSES:
            badput["wasted_progress"] += clip(d.progress, d.end, lo, hi)  # the partial step
        prev_end = d.end if prev_end is None else max(prev_end, d.end)
    upto = {d.attempt: d.upto for d in ordered}
    for c in compile_cuts:
        x = sum(clip(a, b, lo, hi) for a, b in c.intervals)
        badput["compile"] += x
        if c.step <= upto.get(c.attempt, math.inf):
            goodput -= x
        else:
            badput["wasted_progress"] -= x
    total = clip(start, end, lo, hi)
    return RankGoodput(
        rank=parts.rank,
        start=start,
        end=end,
        total_s=total,
        goodput_s=goodput,
        badput_s=badput,
        other_s=total - goodput - sum(badput.values()),
        steps=parts.steps,
        tokens=parts.tokens,
    )


def minus(a: RankGoodput, b: RankGoodput) -> RankGoodput:
    """a without the seconds of b (an excluded window's share of a)."""
    badput = {k: a.badput_s.get(k, 0.0) - b.badput_s.get(k, 0.0) for k in a.badput_s}
    for k, v in b.badput_s.items():
        if k not in badput:
            badput[k] = -v
    return RankGoodput(
        rank=a.rank,
        start=a.start,
        end=a.end,
        total_s=a.total_s - b.total_s,
        goodput_s=a.goodput_s - b.goodput_s,
        badput_s=badput,
        other_s=a.other_s - b.other_s,
        steps=a.steps,
        tokens=a.tokens,
    )


def merged(intervals: Iterable[tuple[float, float]]) -> list[Interval]:
    """The union of intervals, as disjoint intervals in order."""
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1].end:
            out[-1] = Interval(out[-1].start, max(out[-1].end, b))
        elif b > a:
            out.append(Interval(a, b))
    return out


def slowest_rank(per_rank: Sequence[RankGoodput]) -> int | None:
    """The run's rank: the largest total, then the least goodput (both at
    CHOICE_RESOLUTION_S), then the lowest rank."""
    if not per_rank:
        return None

    def key(g: RankGoodput) -> tuple[int, int, int]:
        return (
            -round(g.total_s / CHOICE_RESOLUTION_S),
            round(g.goodput_s / CHOICE_RESOLUTION_S),
            g.rank,
        )

    return min(per_rank, key=key).rank


def run_figures(per_rank: list[RankGoodput], rank: int | None) -> RunGoodput:
    """The run's figures: those of `rank` (chosen on the whole run by slowest_rank)."""
    chosen = next((g for g in per_rank if g.rank == rank), None)
    if chosen is None:
        return RunGoodput(0.0, 0.0, None, empty_badput(), 0.0, rank, 0, 0, per_rank)
    return RunGoodput(
        total_s=chosen.total_s,
        goodput_s=chosen.goodput_s,
        goodput_fraction=chosen.goodput_fraction,
        badput_s=dict(chosen.badput_s),
        other_s=chosen.other_s,
        rank=chosen.rank,
        steps=chosen.steps,
        tokens=chosen.tokens,
        ranks=per_rank,
    )


@dataclass(frozen=True)
class Disruption:
    attempt: int
    time: float
    cause: str
    wasted_steps: int


def disruptions(decided: Sequence[Decided], parts: RankParts) -> list[Disruption]:
    """One per failed or stalled attempt of the rank, from the whole run's parts."""
    return [
        Disruption(
            d.attempt,
            d.end,
            d.cause or d.status,
            parts.split.get(d.attempt, AttemptSplit(0.0, 0.0, 0)).steps_after,
        )
        for d in sorted(decided, key=lambda d: d.attempt)
        if d.status in FAILED_STATUSES
    ]
