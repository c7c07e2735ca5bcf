"""What both sides of the rollups share: the levels, the columns each part reads and the row
layouts ingest writes, the cover of a step range by blocks, and the stored blocking spans.
Callers pass a Session; nothing here commits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, Table, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TypedReturnsRows

from service.calc.goodput import ROUNDING_SLACK_S, SpanIn, StepIn
from service.store.models import (
    ROLLUP_LEVELS,
    Base,
    RoutingBlock,
    RoutingRow,
    Span,
    SpanTotal,
    Step,
    StepBlock,
)

COARSE, FINE = max(ROLLUP_LEVELS), min(ROLLUP_LEVELS)
DESCENDING = tuple(sorted(ROLLUP_LEVELS, reverse=True))

# The columns each part reads, named once.
STEP_IN_COLUMNS = tuple(getattr(Step, f) for f in StepIn._fields)  # rows read as StepIn
STEP_INPUT = (  # what add_steps reads of a step, besides its blocked_s
    Step.run_id,
    Step.attempt,
    Step.rank,
    Step.step,
    Step.start,
    Step.end,
    Step.tokens,
    Step.loss,
    Step.mem_allocated_peak,
    Step.hook_overhead_s,
)
ROLLED_SPAN = (
    Span.run_id,
    Span.attempt,
    Span.rank,
    Span.category,
    Span.start,
    Span.end,
    Span.overlapped,
)
POINT_FIELDS = (  # a routing record's figures in a series point
    "num_steps",
    "num_tokens",
    "max_vio",
    "drop_rate",
    "null_fraction",
    "shared_only_fraction",
    "aux_loss",
    "z_loss",
)
POINT_COLUMNS = tuple(getattr(RoutingRow, f) for f in POINT_FIELDS)
ROLLED_ROUTING = (
    RoutingRow.run_id,
    RoutingRow.attempt,
    RoutingRow.rank,
    RoutingRow.layer,
    RoutingRow.step,
    *POINT_COLUMNS,
)
ROUTING_POINT = (RoutingRow.layer, RoutingRow.step, RoutingRow.attempt, *POINT_COLUMNS)

# Rows as the bulk inserts write them (service/store/bulk.py): what the rollups read first.
STEP_COLUMNS = (
    *(c.key for c in STEP_INPUT),
    "device_time_s",
    "flops",
    "mem_reserved_peak",
    "alloc_retries",
)  # then blocked_s
SPAN_COLUMNS = (*(c.key for c in ROLLED_SPAN), "step", "clashes", "charged_s")
ROUTING_COLUMNS = (
    *(c.key for c in ROLLED_ROUTING),
    "top_k",
    "null_slot",
    "tokens_per_expert",
    "dropped_per_expert",
    "capacity",
    "shared_only_tokens",
)
_STEP_ROW = (*STEP_COLUMNS, "blocked_s")
for _model, _names in ((Step, _STEP_ROW), (Span, SPAN_COLUMNS), (RoutingRow, ROUTING_COLUMNS)):
    assert sorted(_names) == sorted(_model.__table__.c.keys()), f"{_model.__tablename__}: columns"
# _levels_up builds each level from the one below it.
assert all(b % a == 0 for a, b in zip(ROLLUP_LEVELS, ROLLUP_LEVELS[1:], strict=False))

_T = TypeVar("_T")
_K = TypeVar("_K")
_R = TypeVar("_R", bound=tuple[Any, ...])


def table_of(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def core_rows(session: Session, stmt: TypedReturnsRows[_R]) -> CursorResult[_R]:
    """Run a read on the session's connection: Core rows, without the ORM's per-row work."""
    return session.connection().execute(stmt)


def grouped(items: Iterable[_T], key: Callable[[_T], _K]) -> dict[_K, list[_T]]:
    out: dict[_K, list[_T]] = {}
    for r in items:
        out.setdefault(key(r), []).append(r)
    return out


def consecutive(sorted_values: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last), ...] of sorted integers."""
    out: list[tuple[int, int]] = []
    for v in sorted_values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def decompose(
    lo: int, hi: int, levels: Sequence[int] = DESCENDING
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Cover step numbers [lo, hi] with whole blocks, coarsest first: ([(level, first block,
    last block)], [(lo, hi) ranges left for raw rows])."""
    if lo > hi:
        return [], []
    if not levels:
        return [], [(lo, hi)]
    size, finer = levels[0], levels[1:]
    first, last = -(-lo // size), (hi + 1) // size - 1
    if first > last:
        return decompose(lo, hi, finer)
    left_blocks, left_raw = decompose(lo, first * size - 1, finer)
    right_blocks, right_raw = decompose((last + 1) * size, hi, finer)
    return [(size, first, last), *left_blocks, *right_blocks], left_raw + right_raw


def attempts_with(
    session: Session,
    blocks: type[StepBlock] | type[RoutingBlock],
    where_blocks: list[ColumnElement[bool]],
) -> list[int]:
    """The attempts with blocks that the filters admit, ascending."""
    stmt = select(blocks.attempt).where(*where_blocks, blocks.level == COARSE)
    return sorted(session.scalars(stmt.group_by(blocks.attempt)).all())


class Blocking(NamedTuple):
    """A stored blocking span of one rank, with the seconds charged to it if it clashes."""

    attempt: int
    category: str
    start: float
    end: float
    charged_s: float | None


_BLOCKING_COLUMNS = tuple(getattr(Span, f) for f in Blocking._fields)


def stored_blocking(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[Blocking]:
    """Blocking spans of the rank that overlap [lo, hi], through the spans' primary key."""
    totals = session.execute(
        select(SpanTotal.attempt, SpanTotal.category, SpanTotal.longest_s).where(
            SpanTotal.run_id == run_id, SpanTotal.rank == rank, SpanTotal.overlapped.is_(False)
        )
    ).all()
    if not totals:
        return []
    longest = max(t.longest_s for t in totals)
    stmt = select(*_BLOCKING_COLUMNS).where(
        Span.run_id == run_id,
        Span.attempt.in_(sorted({t.attempt for t in totals})),
        Span.rank == rank,
        Span.category.in_(sorted({t.category for t in totals})),
        Span.start >= lo - longest - ROUNDING_SLACK_S,
        Span.start < hi,
        Span.end > lo,
        Span.overlapped.is_(False),
    )
    return [Blocking._make(row) for row in core_rows(session, stmt)]


def stored_blocking_spans(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[SpanIn]:
    """stored_blocking, as the calculators read spans."""
    return [
        SpanIn(s.attempt, rank, s.category, s.start, s.end, False)
        for s in stored_blocking(session, run_id, rank, lo, hi)
    ]
