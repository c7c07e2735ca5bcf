"""Whole-run reads of the rollups: the accounting's inputs (RunRollup, run_parts, compile
cuts), attempts, checkpoints, and the newest step times. Callers pass a Session; nothing here
commits.

Reads split any step range into whole blocks of the coarsest level that fits, finer blocks at
its edges, and raw rows for what is left (fewer than 64 step numbers at each end).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import Row, bindparam, func, select, text
from sqlalchemy.orm import Session

from service.calc.goodput import (
    AttemptIn,
    AttemptSplit,
    CompileCut,
    Decided,
    Interval,
    RankParts,
    SpanIn,
    StepIn,
    inferred_compile,
)
from service.calc.step_stats import RECENT_STEPS, STRAGGLER_STEPS
from service.store.models import (
    Attempt,
    CheckpointCommit,
    ExcludedWindow,
    Span,
    SpanTotal,
    Step,
    StepBlock,
)
from service.store.rollups.common import (
    COARSE,
    STEP_IN_COLUMNS,
    attempts_with,
    core_rows,
    decompose,
    stored_blocking_spans,
)


def _busy_split(
    session: Session,
    run_id: str,
    rank: int,
    attempt: int,
    coarse: list[StepBlock],
    upto: float,
) -> AttemptSplit:
    """Busy time of the attempt's steps at or before `upto`, and after it (with their count)."""
    if upto == math.inf:
        return AttemptSplit(sum(b.busy_s - b.blocked_s for b in coarse), 0.0, 0)
    after, n_after = 0.0, 0
    blocks, raw = decompose(int(upto) + 1, _max_block_end(coarse))
    for r in _blocks_of(session, run_id, rank, attempt, blocks):
        after += r.busy_s - r.blocked_s
        n_after += r.n
    for lo, hi in raw:
        found = session.execute(
            select(
                func.sum(Step.end - Step.start - Step.blocked_s).label("busy"),
                func.count().label("n"),
            ).where(
                Step.run_id == run_id,
                Step.attempt == attempt,
                Step.rank == rank,
                Step.step.between(lo, hi),
            )
        ).one()  # an aggregate: one row
        after += found.busy or 0.0
        n_after += found.n
    total = sum(b.busy_s - b.blocked_s for b in coarse)
    return AttemptSplit(total - after, after, n_after)


def _max_block_end(coarse: list[StepBlock]) -> int:
    return max(((b.block + 1) * COARSE - 1 for b in coarse), default=-1)


def _blocks_of(
    session: Session,
    run_id: str,
    rank: int,
    attempt: int | None,
    ranges: list[tuple[int, int, int]],
) -> list[StepBlock]:
    out: list[StepBlock] = []
    for level, first, last in ranges:
        where = [
            StepBlock.run_id == run_id,
            StepBlock.rank == rank,
            StepBlock.level == level,
            StepBlock.block.between(first, last),
        ]
        if attempt is not None:
            where.append(StepBlock.attempt == attempt)
        out += session.execute(select(StepBlock).where(*where)).scalars().all()
    return out


@dataclass
class RunRollup:
    """What the whole-run accounting reads of a run, in aggregate: attempt rows, each attempt
    rank's records' extent, saved checkpoints, coarse step blocks, span totals (charged by
    precedence through their correction) and the excluded windows. A few rows per attempt
    rank and 1 per 4096 steps."""

    run_id: str
    rows: list[AttemptIn]
    life: dict[tuple[int, int], tuple[float, float]]  # (attempt, rank) -> first, last sign
    saved: dict[int, int]  # attempt -> its last successful checkpoint's step
    coarse: dict[int, dict[int, list[StepBlock]]]  # rank -> attempt -> coarse blocks
    blocking: dict[int, dict[str, float]]  # rank -> category -> seconds, by precedence
    with_compile: set[tuple[int, int]]  # (attempt, rank) that sent compile spans
    excluded: list[Interval]

    @property
    def ranks(self) -> list[int]:
        return sorted({r for _, r in self.life} | {a.rank for a in self.rows})


_ATTEMPT_IN = tuple(getattr(Attempt, f) for f in AttemptIn._fields)


def attempt_rows(session: Session, run_id: str) -> list[AttemptIn]:
    """The run's attempt rows, as the accounting reads them."""
    stmt = select(*_ATTEMPT_IN).where(Attempt.run_id == run_id)
    stmt = stmt.order_by(Attempt.attempt, Attempt.rank)
    return [AttemptIn._make(row) for row in core_rows(session, stmt)]


def saved_checkpoints(session: Session, run_id: str) -> dict[int, int]:
    """Each attempt's last successful checkpoint's step: all the accounting reads of them (a
    run may have thousands), one row per attempt."""
    stmt = (
        select(CheckpointCommit.attempt, func.max(CheckpointCommit.step).label("step"))
        .where(CheckpointCommit.run_id == run_id, CheckpointCommit.ok.is_(True))
        .group_by(CheckpointCommit.attempt)
    )
    return {row.attempt: row.step for row in core_rows(session, stmt)}


def record_life(session: Session, run_id: str) -> dict[tuple[int, int], tuple[float, float]]:
    """Per (attempt, rank): the earliest start and the latest sign of life among its steps,
    spans (blocking or overlapped) and checkpoint commits."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    c = CheckpointCommit
    queries = [
        select(
            StepBlock.attempt,
            StepBlock.rank,
            func.min(StepBlock.first_start).label("first"),
            func.max(StepBlock.last_end).label("last"),
        )
        .where(StepBlock.run_id == run_id, StepBlock.level == COARSE)
        .group_by(StepBlock.attempt, StepBlock.rank),
        select(
            SpanTotal.attempt,
            SpanTotal.rank,
            func.min(SpanTotal.first_start).label("first"),
            func.max(SpanTotal.last_end).label("last"),
        )
        .where(SpanTotal.run_id == run_id)
        .group_by(SpanTotal.attempt, SpanTotal.rank),
        select(c.attempt, c.rank, func.min(c.time).label("first"), func.max(c.time).label("last"))
        .where(c.run_id == run_id)
        .group_by(c.attempt, c.rank),
    ]
    for stmt in queries:
        for row in core_rows(session, stmt):
            lo, hi = out.get((row.attempt, row.rank), (math.inf, -math.inf))
            out[row.attempt, row.rank] = (min(lo, row.first), max(hi, row.last))
    return out


# Through the partial index ix_spans_clashes. SQLite uses a partial index only for a WHERE that
# names its condition, and without statistics it prefers the primary key (which reads every
# span of the run), so on SQLite the statement names the index (SQLAlchemy renders no table
# hints for SQLite). Both read SpanIn's fields, in order.
_CLASHING_SQLITE = text(
    'SELECT attempt, rank, category, start, "end", overlapped FROM spans '
    "INDEXED BY ix_spans_clashes WHERE run_id = :run_id AND clashes"
)
_CLASHING = select(*(getattr(Span, f) for f in SpanIn._fields)).where(
    Span.run_id == bindparam("run_id"), text("spans.clashes")
)


def clashing_spans(session: Session, run_id: str) -> list[SpanIn]:
    """The run's blocking spans that share time with another (few; through their index)."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    stmt = _CLASHING_SQLITE if sqlite else _CLASHING
    found = session.connection().execute(stmt.params(run_id=run_id))
    return [SpanIn._make(row) for row in found]


_INTERVAL = tuple(getattr(ExcludedWindow, f) for f in Interval._fields)


def excluded_windows(session: Session, run_id: str) -> list[Interval]:
    stmt = select(*_INTERVAL).where(ExcludedWindow.run_id == run_id)
    return [Interval._make(row) for row in core_rows(session, stmt)]


def run_rollup(session: Session, run_id: str) -> RunRollup:
    coarse_rows = (
        session.execute(
            select(StepBlock).where(StepBlock.run_id == run_id, StepBlock.level == COARSE)
        )
        .scalars()
        .all()
    )
    coarse: dict[int, dict[int, list[StepBlock]]] = {}
    for b in coarse_rows:
        coarse.setdefault(b.rank, {}).setdefault(b.attempt, []).append(b)
    totals = session.execute(
        select(
            SpanTotal.rank,
            SpanTotal.attempt,
            SpanTotal.category,
            SpanTotal.overlapped,
            (SpanTotal.total_s + SpanTotal.correction_s).label("seconds"),
        ).where(SpanTotal.run_id == run_id)
    ).all()
    blocking: dict[int, dict[str, float]] = {}
    for t in totals:
        if not t.overlapped:
            mine = blocking.setdefault(t.rank, {})
            mine[t.category] = mine.get(t.category, 0.0) + t.seconds
    return RunRollup(
        run_id=run_id,
        rows=attempt_rows(session, run_id),
        life=record_life(session, run_id),
        saved=saved_checkpoints(session, run_id),
        coarse=coarse,
        blocking=blocking,
        with_compile={(t.attempt, t.rank) for t in totals if t.category == "compile"},
        excluded=excluded_windows(session, run_id),
    )


def run_parts(
    session: Session, roll: RunRollup, decided: dict[int, list[Decided]]
) -> dict[int, RankParts]:
    """Each rank's whole-run parts, its steps split at each attempt's decided `upto`."""
    out: dict[int, RankParts] = {}
    for rank, mine in decided.items():
        blocks = roll.coarse.get(rank, {})
        split = {
            d.attempt: _busy_split(
                session, roll.run_id, rank, d.attempt, blocks.get(d.attempt, []), d.upto
            )
            for d in mine
        }
        every = [b for bs in blocks.values() for b in bs]
        out[rank] = RankParts(
            rank=rank,
            split=split,
            blocking_s=roll.blocking.get(rank, {}),
            hook_s=sum(b.hook_s for b in every),
            steps=sum(b.n for b in every),
            tokens=sum(b.tokens for b in every),
        )
    return out


FirstStep = Row[tuple[int, int, int, float, float, float]]


def first_steps(session: Session, run_id: str, keys: Iterable[tuple[int, int]]) -> list[FirstStep]:
    """The first step (lowest number) of each (attempt, rank), with its blocked time: rows of
    attempt, rank, step, start, end, blocked_s."""
    out = []
    for attempt, rank in keys:
        row = core_rows(
            session,
            select(Step.attempt, Step.rank, Step.step, Step.start, Step.end, Step.blocked_s)
            .where(Step.run_id == run_id, Step.attempt == attempt, Step.rank == rank)
            .order_by(Step.step)
            .limit(1),
        ).first()
        if row is not None:
            out.append(row)
    return out


def compile_cuts(
    session: Session, roll: RunRollup, ideal: dict[int, float | None]
) -> list[CompileCut]:
    """The inferred compile of each attempt rank without compile spans (goodput.py)."""
    keys = [
        (attempt, rank)
        for rank, blocks in sorted(roll.coarse.items())
        for attempt in sorted(blocks)
        if (attempt, rank) not in roll.with_compile and ideal.get(rank) is not None
    ]
    out = []
    for s in first_steps(session, roll.run_id, keys):
        spans = (
            stored_blocking_spans(session, roll.run_id, s.rank, s.start, s.end)
            if s.blocked_s > 0
            else []
        )
        cut = inferred_compile(s.start, s.end, ((b.start, b.end) for b in spans), ideal[s.rank])
        if cut:
            out.append(CompileCut(s.attempt, s.rank, s.step, cut))
    return out


def newest_step_times(session: Session, run_id: str, rank: int, limit: int) -> list[float]:
    """Step times of the rank's newest `limit` steps (newest attempt first, then highest
    step), returned oldest first; one index range per attempt."""
    times: list[float] = []
    for attempt in reversed(_step_attempts(session, run_id, rank)):
        if len(times) >= limit:
            break
        stmt = (
            select(Step.end - Step.start)
            .where(Step.run_id == run_id, Step.attempt == attempt, Step.rank == rank)
            .order_by(Step.step.desc())
            .limit(limit - len(times))
        )
        times += core_rows(session, stmt).scalars().all()
    return times[::-1]


def recent_step_times(
    session: Session, run_id: str, ranks: Iterable[int], summary_rank: int | None
) -> dict[int, list[float]]:
    """What step_figures reads: RECENT_STEPS newest step times of the summary rank and
    STRAGGLER_STEPS of every other rank (none of them when the run has one rank)."""
    ranks = list(ranks)
    wanted = ranks if len(ranks) > 1 else [r for r in ranks if r == summary_rank]
    return {
        r: newest_step_times(
            session, run_id, r, RECENT_STEPS if r == summary_rank else STRAGGLER_STEPS
        )
        for r in wanted
    }


class RankSums(NamedTuple):
    steps: int
    tokens: int
    busy_s: float  # sum of end - start


def rank_step_sums(session: Session, run_id: str) -> dict[int, RankSums]:
    """Per rank: step count, tokens and step time, from the coarse blocks."""
    b = StepBlock
    stmt = (
        select(
            b.rank,
            func.sum(b.n).label("steps"),
            func.sum(b.tokens).label("tokens"),
            func.sum(b.busy_s).label("busy_s"),
        )
        .where(b.run_id == run_id, b.level == COARSE)
        .group_by(b.rank)
    )
    return {
        r.rank: RankSums(int(r.steps), int(r.tokens), float(r.busy_s))
        for r in core_rows(session, stmt)
    }


def newest_attempt_steps(session: Session, run_id: str, rank: int, limit: int) -> list[StepIn]:
    """The newest `limit` steps of the rank's newest attempt with steps, in step order."""
    attempts = _step_attempts(session, run_id, rank)
    if not attempts:
        return []
    attempt = attempts[-1]
    stmt = (
        select(*STEP_IN_COLUMNS)
        .where(Step.run_id == run_id, Step.attempt == attempt, Step.rank == rank)
        .order_by(Step.step.desc())
        .limit(limit)
    )
    return [StepIn._make(row) for row in core_rows(session, stmt).all()][::-1]


def _step_attempts(session: Session, run_id: str, rank: int) -> list[int]:
    """The rank's attempts with steps, ascending."""
    return attempts_with(session, StepBlock, [StepBlock.run_id == run_id, StepBlock.rank == rank])
