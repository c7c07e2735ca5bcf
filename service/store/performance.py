"""Reads of the performance page (services/performance.py): each rank's steps summed per
bucket of step numbers or of wall time (mean step time, peak memory), from the step blocks
on long runs; and the run's recompiles. Bounded whatever the run's length: one row per
(rank, attempt, bucket). Callers pass a Session; nothing here commits."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, NamedTuple

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, func, select
from sqlalchemy.orm import Session

from service.store.models import Attempt, Observation, Step, StepBlock
from service.store.rollups.common import COARSE, FINE, core_rows

RECOMPILE_SEAM = "recompile"  # the seam the hooks observe recompiles at (calc/receipts.py)


class StepBucket(NamedTuple):
    """One rank's steps of one attempt in one bucket."""

    rank: int
    attempt: int
    bucket: int
    n: int
    busy_s: float  # sum of their step times (end - start)
    mem_peak: int | None  # the largest mem_allocated_peak among them
    first_start: float
    first_step: int


def _floor(session: Session, x: ColumnElement[Any]) -> ColumnElement[int]:
    """floor(x) for x >= 0: SQLite's CAST truncates, PostgreSQL's rounds."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(x, Integer)
    return cast(func.floor(x), BigInteger)


def step_buckets(
    session: Session,
    run_id: str,
    axis: Literal["step", "time"],
    origin: float,
    width: float,
    level: int,
    ranks: Collection[int] | None = None,
) -> list[StepBucket]:
    """Steps grouped by rank, attempt and bucket: `floor(step / width)` (axis "step"; width
    a multiple of `level`) or `floor((start - origin) / width)` ("time"). `level` 1 reads the
    steps; a rollup level reads its blocks (on the time axis a block falls in the bucket of
    its first start)."""
    # (rank, attempt, count, summed step time, largest memory peak, first start, first step;
    # then the step number and start a bucket is of), from the steps or from the blocks
    cols: list[Any]
    step_no: Any
    start: Any
    if level == 1:
        s = Step
        cols = [s.rank, s.attempt, func.count(), func.sum(s.end - s.start)]
        cols += [func.max(s.mem_allocated_peak), func.min(s.start), func.min(s.step)]
        step_no, start = s.step, s.start
        where = [s.run_id == run_id]
    else:
        b = StepBlock
        cols = [b.rank, b.attempt, func.sum(b.n), func.sum(b.busy_s)]
        cols += [func.max(b.mem_peak), func.min(b.first_start), func.min(b.block * level)]
        step_no, start = b.block * level, b.first_start
        where = [b.run_id == run_id, b.level == level]
    if ranks is not None:
        where.append(cols[0].in_(sorted(ranks)))
    x = step_no / float(width) if axis == "step" else (start - origin) / width
    bucket = _floor(session, x).label("bucket")
    stmt = (
        select(cols[0], cols[1], bucket, *cols[2:]).where(*where).group_by(cols[0], cols[1], bucket)
    )
    return [
        StepBucket(rank, attempt, int(bk), int(n), float(busy), mem, first, int(first_step))
        for rank, attempt, bk, n, busy, mem, first, first_step in core_rows(session, stmt)
    ]


class RankSpan(NamedTuple):
    rank: int
    steps: int
    step_bound: int  # above its highest step number by less than FINE (the blocks say no more)
    first_start: float
    last_end: float


def rank_spans(session: Session, run_id: str) -> list[RankSpan]:
    """Per rank with steps: how many, a bound on their numbers, the first start and the last
    end, from the blocks (a few rows per rank and 64 steps)."""
    b = StepBlock
    coarse = select(b.rank, func.sum(b.n), func.min(b.first_start), func.max(b.last_end)).where(
        b.run_id == run_id, b.level == COARSE
    )
    fine = select(b.rank, func.max(b.block)).where(b.run_id == run_id, b.level == FINE)
    bound = dict(core_rows(session, fine.group_by(b.rank)).tuples().all())
    return [
        RankSpan(rank, int(n), (int(bound.get(rank, 0)) + 1) * FINE - 1, first, last)
        for rank, n, first, last in core_rows(session, coarse.group_by(b.rank).order_by(b.rank))
    ]


class RecompileRow(NamedTuple):
    attempt: int
    rank: int
    step: int | None
    time: float
    observed: str  # e.g. "recompile 0/1": the compile id
    reason: str | None  # the guard that failed


def recompiles(session: Session, run_id: str, limit: int) -> tuple[int, list[RecompileRow]]:
    """(how many recompile observations the run has, the first `limit` of them by time)."""
    o = Observation
    where = [o.run_id == run_id, o.seam == RECOMPILE_SEAM]
    total = session.scalar(select(func.count()).select_from(o).where(*where)) or 0
    stmt = (
        select(o.attempt, o.rank, o.step, o.time, o.observed, o.reason)
        .where(*where)
        .order_by(o.time, o.attempt, o.rank, o.observed)
        .limit(limit)
    )
    return int(total), [RecompileRow._make(row) for row in core_rows(session, stmt)]


def recompile_counts(session: Session, run_id: str) -> dict[tuple[int, int], tuple[int, int]]:
    """Per (attempt, rank): (recompile observations stored, recompiles its attempt_end
    counted: counters.recompiles, which includes what the sink may have dropped)."""
    o = Observation
    seen = core_rows(
        session,
        select(o.attempt, o.rank, func.count())
        .where(o.run_id == run_id, o.seam == RECOMPILE_SEAM)
        .group_by(o.attempt, o.rank),
    )
    out = {(a, r): (int(n), 0) for a, r, n in seen}
    stmt = select(Attempt.attempt, Attempt.rank, Attempt.counters).where(Attempt.run_id == run_id)
    for a, r, counters in core_rows(session, stmt):
        n = (counters or {}).get("recompiles")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            out[a, r] = (out.get((a, r), (0, 0))[0], n)
    return out
