"""Reads of the goodput timeline (services/timeline.py): a run's blocking spans in pieces
that a merge at the timeline's resolution would join anyway, and the time extent of a range
of one attempt rank's steps. Both are bounded whatever the run's length: at most a piece
per (attempt, rank, category) and bucket of wall time, the steps from their blocks.
Callers pass a Session; nothing here commits."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NamedTuple

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, exists, func, literal, select
from sqlalchemy.orm import Session

from service.store.models import Span, SpanTotal, Step, StepBlock
from service.store.rollups.common import core_rows, decompose


class SpanPiece(NamedTuple):
    """Blocking spans of one attempt rank and category whose consecutive starts lie less than
    the resolution apart (so that a merge at that resolution joins them whatever their
    lengths): their earliest start, latest end, the seconds charged to them (by precedence:
    a clashing span's `charged_s`, else its length) and how many."""

    attempt: int
    rank: int
    category: str
    start: float
    end: float
    charged_s: float
    n: int


Key = tuple[int, int, str]  # attempt, rank, category

_CHARGED = func.sum(func.coalesce(Span.charged_s, Span.end - Span.start))


def _floor(session: Session, x: ColumnElement[float]) -> ColumnElement[int]:
    """floor(x) for x >= 0: SQLite's CAST truncates, PostgreSQL's rounds."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(x, Integer)
    return cast(func.floor(x), BigInteger)


def _of(run_id: str, key: Key) -> list[ColumnElement[bool]]:
    attempt, rank, category = key
    return [
        Span.run_id == run_id,
        Span.attempt == attempt,
        Span.rank == rank,
        Span.category == category,
        Span.overlapped.is_(False),
    ]


def _grouped(
    session: Session, run_id: str, key: Key, origin: float, resolution: float
) -> list[SpanPiece]:
    """A sparse key's spans grouped by bucket of start (starts in one bucket are less than
    its width apart): one statement, sorting its few spans."""
    bucket = _floor(session, (Span.start - origin) / resolution).label("bucket")
    stmt = (
        select(func.min(Span.start), func.max(Span.end), _CHARGED, func.count())
        .where(*_of(run_id, key))
        .group_by(bucket)
    )
    return [SpanPiece(*key, *row) for row in core_rows(session, stmt)]


def _empty_buckets(
    session: Session, run_id: str, key: Key, origin: float, width: float, first: int, last: int
) -> list[int]:
    """The buckets [first, last] of `width` in which no span of the key starts: one
    statement, a probe of the key's index per bucket (no span read)."""
    walk = select(literal(first, Integer).label("b")).cte("walk", recursive=True)
    walk = walk.union_all(select(walk.c.b + 1).where(walk.c.b < last))
    lo, hi = origin + walk.c.b * width, origin + (walk.c.b + 1) * width
    starts = exists().where(*_of(run_id, key), Span.start >= lo, Span.start < hi)
    return list(session.scalars(select(walk.c.b).where(~starts)))


def _dense(
    session: Session, run_id: str, total: SpanTotalRow, origin: float, resolution: float
) -> list[SpanPiece]:
    """A dense key's spans in pieces: the runs of half-resolution buckets that spans start
    in (consecutive starts in one run are less than a resolution apart). A key whose every
    bucket is started in, as a span per step makes it, is one piece read from its rollup
    (span_totals) without reading a span; otherwise each run is summed by the database."""
    key = (total.attempt, total.rank, total.category)
    width = resolution / 2
    first = int((total.first_start - origin) / width)
    last = int((total.last_end - origin) / width)
    empty = _empty_buckets(session, run_id, key, origin, width, first, last)
    if not empty:
        charged = total.total_s + total.correction_s
        return [SpanPiece(*key, total.first_start, total.last_end, charged, total.n)]
    # Each run of started buckets, with the empty ones after it: ranges that tile the line.
    gaps = set(empty)
    edges = [b for b in range(first + 1, last + 1) if b not in gaps and b - 1 in gaps]
    bounds = [-math.inf, *(origin + b * width for b in edges), math.inf]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        stmt = select(func.min(Span.start), func.max(Span.end), _CHARGED, func.count()).where(
            *_of(run_id, key), Span.start >= lo, Span.start < hi
        )
        row = core_rows(session, stmt).one()
        if row[3]:
            out.append(SpanPiece(*key, *row))
    return out


class SpanTotalRow(NamedTuple):
    attempt: int
    rank: int
    category: str
    n: int
    total_s: float
    correction_s: float
    first_start: float
    last_end: float


_TOTAL_COLUMNS = tuple(getattr(SpanTotal, f) for f in SpanTotalRow._fields)


def span_pieces(
    session: Session,
    run_id: str,
    origin: float,
    resolution: float,
    attempts: Collection[int] | None = None,
    ranks: Collection[int] | None = None,
) -> list[SpanPiece]:
    """The run's blocking spans (overlapped ones are never charged) in pieces per attempt,
    rank and category, each a chain of spans whose starts lie less than `resolution` apart;
    `origin` at or before every span's start. Bounded at any length: a key with more spans
    than half-resolution buckets in its extent is probed bucket by bucket (and, when spans
    start in every bucket, not read at all); the others are grouped by the database."""
    t = SpanTotal
    where = [t.run_id == run_id, t.overlapped.is_(False)]
    if attempts is not None:
        where.append(t.attempt.in_(sorted(attempts)))
    if ranks is not None:
        where.append(t.rank.in_(sorted(ranks)))
    out: list[SpanPiece] = []
    for row in core_rows(session, select(*_TOTAL_COLUMNS).where(*where)):
        total = SpanTotalRow._make(row)
        buckets = (total.last_end - total.first_start) / (resolution / 2) + 1
        if total.n > buckets:
            out += _dense(session, run_id, total, origin, resolution)
        else:
            key = (total.attempt, total.rank, total.category)
            out += _grouped(session, run_id, key, origin, resolution)
    return out


def steps_extent(
    session: Session, run_id: str, attempt: int, rank: int, first: int, last: int
) -> tuple[float, float] | None:
    """The earliest start and latest end of the attempt rank's steps numbered [first, last]
    (None: no such step), from the blocks wholly inside and raw rows at the edges."""
    if first > last:
        return None
    blocks, raw = decompose(first, last)
    lo, hi = float("inf"), float("-inf")
    b = StepBlock
    for level, b0, b1 in blocks:
        row = core_rows(
            session,
            select(func.min(b.first_start), func.max(b.last_end)).where(
                b.run_id == run_id,
                b.rank == rank,
                b.attempt == attempt,
                b.level == level,
                b.block.between(b0, b1),
            ),
        ).one()
        if row[0] is not None:
            lo, hi = min(lo, row[0]), max(hi, row[1])
    for s0, s1 in raw:
        row = core_rows(
            session,
            select(func.min(Step.start), func.max(Step.end)).where(
                Step.run_id == run_id,
                Step.attempt == attempt,
                Step.rank == rank,
                Step.step.between(s0, s1),
            ),
        ).one()
        if row[0] is not None:
            lo, hi = min(lo, row[0]), max(hi, row[1])
    return (lo, hi) if lo <= hi else None


def last_step(session: Session, run_id: str, attempt: int, rank: int) -> int | None:
    """The attempt rank's highest step number (None: no steps), through the key."""
    return session.scalar(
        select(func.max(Step.step)).where(
            Step.run_id == run_id, Step.attempt == attempt, Step.rank == rank
        )
    )
