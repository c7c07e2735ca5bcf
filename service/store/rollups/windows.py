"""A time window's share of the run's records, summed by the database (the rollups' SQL
lives in service/store/rollups/). Callers pass a Session; nothing here writes.

The definition is `goodput_window.parts_of`: every record cut to [lo, hi] and summed; the
whole run's decisions (each attempt's end, status and committed steps: goodput.decide) are
kept, not re-derived from the cut records. Here the sums come from a few statements per
window whose rows the database sums, instead of every overlapping record read into Python:

- spans: per (attempt, rank, category, overlapped), the sum of the cut durations, over the
  spans that overlap the window. Each category's spans are found through the spans' primary
  key, from the category's longest span before `lo`. The clashing spans (few, read once) turn
  these sums into seconds charged by precedence (goodput.clash_correction).
- steps: found through the fine step blocks whose time span meets the window, then read by
  step number. The database sums count, tokens, the hook time of the steps that end inside,
  and, for the steps wholly inside, step time minus `blocked_s` on either side of the
  attempt's last successful checkpoint (the one step number the accounting splits at). The
  few steps that cross an edge come back as rows: their blocked time inside the window is
  measured against the blocking spans there, as the definition measures every step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Double,
    Integer,
    String,
    and_,
    bindparam,
    case,
    func,
    not_,
    select,
)
from sqlalchemy.orm import Session

from service.calc.goodput import (
    ROUNDING_SLACK_S,
    AttemptSplit,
    Decided,
    RankParts,
    SpanIn,
    SpanIndex,
    clash_correction,
)
from service.calc.step_stats import RECENT_STEPS, STRAGGLER_STEPS
from service.store.models import Span, SpanTotal, Step, StepBlock
from service.store.rollups.common import COARSE, FINE, consecutive, core_rows, grouped
from service.store.rollups.read import clashing_spans, saved_checkpoints

# The statements, built once with bound parameters and run with each window's values (built
# per window, their construction cost more than the database's work). LO and HI: the window.
LO, HI = bindparam("lo", type_=Double), bindparam("hi", type_=Double)
_RUN = bindparam("run_id", type_=String)


def _later(x: Any) -> Any:
    """SQL: max(x, LO), the same on SQLite and PostgreSQL."""
    return case((x > LO, x), else_=LO)


def _earlier(x: Any) -> Any:
    """SQL: min(x, HI)."""
    return case((x < HI, x), else_=HI)


_b = StepBlock
FINE_BLOCKS = select(
    _b.attempt,
    _b.rank,
    _b.block,
    _b.n,
    _b.busy_s - _b.blocked_s,
    _b.tokens,
    _b.hook_s,
    _b.first_start,
    _b.last_end,
).where(
    _b.run_id == _RUN,
    _b.rank.in_(bindparam("ranks", expanding=True)),
    _b.level == FINE,
    _b.last_end > LO,
    _b.last_end <= bindparam("reach", type_=Double),  # HI + the longest block
    _b.first_start < HI,
)
# The steps numbered first..last of one attempt rank that overlap the window.
_STEPS_IN = and_(
    Step.run_id == _RUN,
    Step.attempt == bindparam("attempt", type_=Integer),
    Step.rank == bindparam("rank", type_=Integer),
    Step.step.between(bindparam("first", type_=BigInteger), bindparam("last", type_=BigInteger)),
    Step.end > LO,
    Step.start < HI,
)
_INSIDE = and_(Step.start >= LO, Step.end <= HI)
_SAVED = bindparam("saved", type_=BigInteger)  # the attempt's last successful checkpoint
_BUSY = Step.end - Step.start - Step.blocked_s
STEP_SUMS = select(
    func.count(),
    func.sum(Step.tokens),
    func.sum(case((Step.end <= HI, func.coalesce(Step.hook_overhead_s, 0.0)), else_=0.0)),
    func.min(_later(Step.start)),
    func.max(_earlier(Step.end)),
    func.sum(case((and_(_INSIDE, Step.step <= _SAVED), _BUSY), else_=0.0)),
    func.sum(case((and_(_INSIDE, Step.step > _SAVED), _BUSY), else_=0.0)),
    func.sum(case((Step.step > _SAVED, 1), else_=0)),
).where(_STEPS_IN)
EDGE_STEPS = select(Step.step, Step.start, Step.end).where(_STEPS_IN, not_(_INSIDE))
RECENT_TIMES = (
    select(_earlier(Step.end) - _later(Step.start))
    .where(_STEPS_IN)
    .order_by(Step.step.desc())
    .limit(bindparam("limit", type_=Integer))
)
# One category's spans of some attempts and ranks that overlap the window, found through the
# spans' primary key from the category's longest span before LO.
_SPANS_IN = and_(
    Span.run_id == _RUN,
    Span.attempt.in_(bindparam("attempts", expanding=True)),
    Span.rank.in_(bindparam("ranks", expanding=True)),
    Span.category == bindparam("category", type_=String),
    Span.start >= bindparam("reach", type_=Double),  # LO - the longest span
    Span.start < HI,
    Span.end > LO,
)
SPAN_SUMS = (
    select(
        Span.attempt,
        Span.rank,
        Span.category,
        Span.overlapped,
        func.sum(_earlier(Span.end) - _later(Span.start)),
        func.min(_later(Span.start)),
        func.max(_earlier(Span.end)),
    )
    .where(_SPANS_IN)
    .group_by(Span.attempt, Span.rank, Span.category, Span.overlapped)
)
BLOCKING_SPANS = select(
    Span.attempt, Span.rank, Span.category, Span.start, Span.end, Span.overlapped
).where(_SPANS_IN, Span.overlapped.is_(False))


class _Edge(NamedTuple):
    attempt: int
    rank: int
    step: int
    start: float
    end: float


@dataclass
class _Sums:
    """One attempt rank's steps in a window, summed."""

    n: int = 0
    tokens: int = 0
    hook_s: float = 0.0
    first: float = math.inf
    last: float = -math.inf
    busy_upto: float = 0.0  # step time minus blocked time, steps <= the checkpoint
    busy_after: float = 0.0
    n_after: int = 0

    def add(
        self,
        n: int,
        tokens: int,
        hook_s: float,
        first: float,
        last: float,
        busy_upto: float,
        busy_after: float,
        n_after: int,
    ) -> None:
        self.n += n
        self.tokens += tokens
        self.hook_s += hook_s
        self.first, self.last = min(self.first, first), max(self.last, last)
        self.busy_upto += busy_upto
        self.busy_after += busy_after
        self.n_after += n_after

    def split(self, upto: float, checkpoint: int) -> AttemptSplit:
        if upto == math.inf:
            return AttemptSplit(self.busy_upto + self.busy_after, 0.0, 0)
        if upto != checkpoint:  # the accounting only ever cuts at these two
            raise RuntimeError(f"no sums kept for a cut at step {upto}")
        return AttemptSplit(self.busy_upto, self.busy_after, self.n_after)


@dataclass
class WindowParts:
    """Every rank's records cut to a window, summed; and per (attempt, rank), the step
    numbers of the fine blocks that meet the window."""

    ranks: dict[int, RankParts]
    ranges: dict[tuple[int, int], list[tuple[int, int]]]


class WindowReader:
    """Reads a run's windows: what every window shares (the whole run's decisions, saved
    checkpoints, span categories, clashing spans, the longest fine block) is read once."""

    def __init__(
        self, session: Session, run_id: str, decided: Mapping[int, Sequence[Decided]]
    ) -> None:
        """`decided`: the whole run's decisions per rank (where each attempt's progress ends)."""
        self.session, self.run_id = session, run_id
        self.upto = {d.attempt: d.upto for ds in decided.values() for d in ds}
        self.saved = saved_checkpoints(session, run_id)
        self.clashing = {
            rank: _SortedSpans(spans)
            for rank, spans in _group_by_rank(clashing_spans(session, run_id)).items()
        }
        t = SpanTotal
        self.span_groups = core_rows(
            session,
            select(
                t.attempt, t.rank, t.category, t.overlapped, t.longest_s, t.first_start, t.last_end
            ).where(t.run_id == run_id),
        ).all()
        b = StepBlock
        self.block_ranks = sorted(
            core_rows(
                session,
                select(b.rank).where(b.run_id == run_id, b.level == COARSE).distinct(),
            ).scalars()
        )
        longest = core_rows(
            session,
            select(func.max(b.last_end - b.first_start)).where(b.run_id == run_id, b.level == FINE),
        ).scalar()
        self.longest_block = longest or 0.0

    def parts(self, lo: float, hi: float) -> WindowParts:
        """The run's records as seen through [lo, hi], in aggregate."""
        if not hi > lo:
            raise ValueError(f"end ({hi}) must be after start ({lo})")
        blocks = self._fine_blocks(lo, hi)
        sums, raw = self._whole_blocks(lo, hi, blocks)
        raw_ranges = _ranges(raw)
        self._step_sums(lo, hi, raw_ranges, sums)
        self._add_edges(lo, hi, raw_ranges, sums)
        blocking: dict[int, dict[str, float]] = {}
        for _, rank, category, overlapped, total, _, _ in self._span_sums(lo, hi):
            if not overlapped:
                mine = blocking.setdefault(rank, {})
                mine[category] = mine.get(category, 0.0) + total
        for rank, sorted_spans in self.clashing.items():
            for category, x in clash_correction(sorted_spans.meeting(lo, hi), lo, hi).items():
                if x:
                    mine = blocking.setdefault(rank, {})
                    mine[category] = mine.get(category, 0.0) + x
        ranks = sorted({rank for _, rank in sums} | set(blocking))
        out: dict[int, RankParts] = {}
        for rank in ranks:
            mine_sums = {attempt: s for (attempt, r), s in sums.items() if r == rank}
            out[rank] = RankParts(
                rank=rank,
                split={
                    attempt: s.split(self.upto.get(attempt, math.inf), self.saved.get(attempt, -1))
                    for attempt, s in mine_sums.items()
                },
                blocking_s=blocking.get(rank, {}),
                hook_s=sum(s.hook_s for s in mine_sums.values()),
                steps=sum(s.n for s in mine_sums.values()),
                tokens=sum(s.tokens for s in mine_sums.values()),
            )
        return WindowParts(out, _ranges(blocks))

    # -- steps --

    def _run(self, stmt: Any, **params: Any) -> Any:
        return self.session.connection().execute(stmt, {"run_id": self.run_id, **params})

    def _fine_blocks(self, lo: float, hi: float) -> list[Any]:
        """The fine blocks whose time span meets the window: they hold every step that
        overlaps it. A block ends no later than `longest_block` after it starts, which bounds
        the index range read."""
        if not self.block_ranks:
            return []
        reach = hi + self.longest_block + ROUNDING_SLACK_S
        return list(self._run(FINE_BLOCKS, ranks=self.block_ranks, lo=lo, hi=hi, reach=reach))

    def _whole_blocks(
        self, lo: float, hi: float, blocks: list[Any]
    ) -> tuple[dict[tuple[int, int], _Sums], list[Any]]:
        """Sums of the blocks that lie wholly inside the window and on one side of their
        attempt's checkpoint, and the other blocks, whose steps are read."""
        sums: dict[tuple[int, int], _Sums] = {}
        raw = []
        for attempt, rank, block, n, busy, tokens, hook, first, last in blocks:
            saved = self.saved.get(attempt, -1)
            after = block * FINE > saved
            if first < lo or last > hi or (not after and (block + 1) * FINE - 1 > saved):
                raw.append((attempt, rank, block))
                continue
            split = (0.0, busy, n) if after else (busy, 0.0, 0)
            sums.setdefault((attempt, rank), _Sums()).add(n, tokens, hook, first, last, *split)
        return sums, raw

    def _step_sums(
        self,
        lo: float,
        hi: float,
        ranges: dict[tuple[int, int], list[tuple[int, int]]],
        out: dict[tuple[int, int], _Sums],
    ) -> None:
        """Add the sums of the steps in `ranges` that overlap the window."""
        for (attempt, rank), spans in ranges.items():
            saved = self.saved.get(attempt, -1)
            for first, last in spans:
                where = {"attempt": attempt, "rank": rank, "first": first, "last": last}
                row = self._run(STEP_SUMS, lo=lo, hi=hi, saved=saved, **where).one()
                n, tokens, hook, first_start, last_end, upto, after, n_after = row
                if n:  # PostgreSQL sums bigints as numeric
                    sums = (int(tokens), hook, first_start, last_end, upto, after, int(n_after))
                    out.setdefault((attempt, rank), _Sums()).add(n, *sums)

    def _add_edges(
        self,
        lo: float,
        hi: float,
        ranges: dict[tuple[int, int], list[tuple[int, int]]],
        sums: dict[tuple[int, int], _Sums],
    ) -> None:
        """Busy time of the steps that cross an edge of the window: cut to it, minus their
        overlap with the blocking spans there."""
        edges = [
            _Edge(attempt, rank, step, start, end)
            for (attempt, rank), spans in ranges.items()
            for first, last in spans
            for step, start, end in self._run(
                EDGE_STEPS, lo=lo, hi=hi, attempt=attempt, rank=rank, first=first, last=last
            )
        ]
        if not edges:
            return
        cut = [(max(s.start, lo), min(s.end, hi)) for s in edges]
        blocked = [0.0] * len(edges)
        left = [i for i, s in enumerate(edges) if s.start < lo]  # these reach from lo
        right = [i for i, s in enumerate(edges) if s.start >= lo]  # these reach to hi
        for part in (left, right):
            if not part:
                continue
            a, b = min(cut[i][0] for i in part), max(cut[i][1] for i in part)
            spans = self._blocking_spans({edges[i].rank for i in part}, a, b)
            by_rank = grouped(spans, lambda s: s.rank)
            for rank, mine in grouped(part, lambda i: edges[i].rank).items():
                index = SpanIndex(by_rank.get(rank, []))
                for i, x in zip(mine, index.overlaps([cut[i] for i in mine]), strict=True):
                    blocked[i] = x
        for s, (a, b), x in zip(edges, cut, blocked, strict=True):
            target = sums[s.attempt, s.rank]
            if s.step <= self.saved.get(s.attempt, -1):
                target.busy_upto += (b - a) - x
            else:
                target.busy_after += (b - a) - x

    def _blocking_spans(self, ranks: set[int], lo: float, hi: float) -> list[SpanIn]:
        """The ranks' blocking spans that overlap [lo, hi] (every attempt's: a step's blocked
        time counts any span on its rank)."""
        groups = [g for g in self.span_groups if g.rank in ranks and not g.overlapped]
        return [
            SpanIn(*row)
            for params in self._span_params(groups, lo, hi)
            for row in self._run(BLOCKING_SPANS, **params)
        ]

    # -- spans --

    def _span_params(self, groups: Iterable[Any], lo: float, hi: float) -> list[dict[str, Any]]:
        """The parameters of _SPANS_IN for each category among the span total rows `groups`
        whose time span meets [lo, hi]."""
        out: dict[str, dict[str, Any]] = {}
        for g in groups:
            if not (g.first_start < hi and g.last_end > lo):
                continue
            p = out.setdefault(g.category, {"attempts": set(), "ranks": set(), "longest": 0.0})
            p["attempts"].add(g.attempt)
            p["ranks"].add(g.rank)
            p["longest"] = max(p["longest"], g.longest_s)
        return [
            {
                "category": category,
                "attempts": sorted(p["attempts"]),
                "ranks": sorted(p["ranks"]),
                "reach": lo - p["longest"] - ROUNDING_SLACK_S,
                "lo": lo,
                "hi": hi,
            }
            for category, p in sorted(out.items())
        ]

    def _span_sums(self, lo: float, hi: float) -> list[Any]:
        """(attempt, rank, category, overlapped, cut seconds, first cut start, last cut end)
        of the spans that overlap the window."""
        return [
            row
            for params in self._span_params(self.span_groups, lo, hi)
            for row in self._run(SPAN_SUMS, **params)
        ]

    # -- the step-time figures --

    def recent_step_times(
        self, lo: float, hi: float, window: WindowParts, summary_rank: int | None
    ) -> dict[int, list[float]]:
        """What step_figures reads, of the steps cut to the window: the summary rank's newest
        RECENT_STEPS step times and every other rank's newest STRAGGLER_STEPS (none of them
        when the window holds one rank), oldest first."""
        ranks = sorted({rank for _, rank in window.ranges})
        wanted = ranks if len(ranks) > 1 else [r for r in ranks if r == summary_rank]
        out: dict[int, list[float]] = {}
        for rank in wanted:
            limit = RECENT_STEPS if rank == summary_rank else STRAGGLER_STEPS
            times: list[float] = []
            keys = sorted((k for k in window.ranges if k[1] == rank), reverse=True)
            for attempt, _ in keys:
                for first, last in reversed(window.ranges[attempt, rank]):
                    if len(times) >= limit:
                        break
                    where = {"attempt": attempt, "rank": rank, "first": first, "last": last}
                    left = limit - len(times)
                    times += self._run(RECENT_TIMES, lo=lo, hi=hi, limit=left, **where).scalars()
            out[rank] = times[::-1]
        return out


class _SortedSpans:
    """Spans in start order, for finding those that meet a window without reading all."""

    def __init__(self, spans: list[SpanIn]) -> None:
        self.spans = sorted(spans, key=lambda s: s.start)
        self.starts = [s.start for s in self.spans]
        self.longest = max((s.end - s.start for s in self.spans), default=0.0)

    def meeting(self, lo: float, hi: float) -> list[SpanIn]:
        first = bisect.bisect_left(self.starts, lo - self.longest - ROUNDING_SLACK_S)
        last = bisect.bisect_left(self.starts, hi)
        return [s for s in self.spans[first:last] if s.end > lo]


def _group_by_rank(spans: list[SpanIn]) -> dict[int, list[SpanIn]]:
    out: dict[int, list[SpanIn]] = {}
    for s in spans:
        out.setdefault(s.rank, []).append(s)
    return out


def _ranges(blocks: Iterable[Any]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Per (attempt, rank): the step numbers of the blocks, as runs of whole blocks."""
    by_key = grouped(blocks, lambda r: (r[0], r[1]))
    return {
        key: [
            (first * FINE, (last + 1) * FINE - 1)
            for first, last in consecutive(sorted(r[2] for r in rows))
        ]
        for key, rows in sorted(by_key.items())
    }
