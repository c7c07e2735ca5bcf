"""What both sides of the rollups share: the levels, the columns each part reads and the row
layouts ingest writes, the cover of a step range by blocks, and the stored blocking spans.
Callers pass a Session; nothing here commits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, Table, bindparam, select
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
    Step.device_time_s,
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


def core_rows(
    session: Session, stmt: TypedReturnsRows[_R], params: dict[str, Any] | None = None
) -> CursorResult[_R]:
    """Run a read on the session's connection: Core rows, without the ORM's per-row work."""
    return session.connection().execute(stmt, params)


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


_SPAN_TOTALS = table_of(SpanTotal).c
_SPANS = table_of(Span).c
# Built once (statements with parameters): building a statement cost about as much as
# running it, and these run a few times a batch.
_BLOCKING_TOTALS = select(
    _SPAN_TOTALS.attempt, _SPAN_TOTALS.category, _SPAN_TOTALS.longest_s
).where(
    _SPAN_TOTALS.run_id == bindparam("run_id"),
    _SPAN_TOTALS.rank == bindparam("rank"),
    _SPAN_TOTALS.overlapped.is_(False),
)
_BLOCKING = select(*(_SPANS[f] for f in Blocking._fields)).where(
    _SPANS.run_id == bindparam("run_id"),
    _SPANS.attempt.in_(bindparam("attempts", expanding=True)),
    _SPANS.rank == bindparam("rank"),
    _SPANS.category.in_(bindparam("categories", expanding=True)),
    _SPANS.start >= bindparam("since"),
    _SPANS.start < bindparam("hi"),
    _SPANS.end > bindparam("lo"),
    _SPANS.overlapped.is_(False),
)


def _lookback(session: Session, run_id: str, rank: int) -> tuple[float, dict[str, Any]] | None:
    """The longest blocking span of the rank and the filters that find its blocking spans
    (their attempts and categories), from span_totals; None if it has none."""
    totals = core_rows(session, _BLOCKING_TOTALS, {"run_id": run_id, "rank": rank}).all()
    if not totals:
        return None
    return max(t.longest_s for t in totals), {
        "run_id": run_id,
        "rank": rank,
        "attempts": sorted({t.attempt for t in totals}),
        "categories": sorted({t.category for t in totals}),
    }


def _blocking_since(lo: float, longest: float) -> float:
    """The earliest start of a span that can reach past `lo`."""
    return lo - longest - ROUNDING_SLACK_S


def _read_blocking(session: Session, run_id: str, rank: int, lo: float, hi: float) -> _Held | None:
    """stored_blocking's spans with the range read and the longest span; None if the rank
    has no blocking span."""
    found = _lookback(session, run_id, rank)
    if found is None:
        return None
    longest, where = found
    params = {**where, "since": _blocking_since(lo, longest), "lo": lo, "hi": hi}
    spans = [Blocking._make(row) for row in core_rows(session, _BLOCKING, params)]
    return _Held(lo, hi, longest, spans)


def stored_blocking(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[Blocking]:
    """Blocking spans of the rank that overlap [lo, hi], through the spans' primary key."""
    held = _read_blocking(session, run_id, rank, lo, hi)
    return [] if held is None else held.spans


class _Held(NamedTuple):
    lo: float
    hi: float
    longest: float
    spans: list[Blocking]


_FINE_BLOCKS = table_of(StepBlock).c
_STEP_BLOCKS_MEETING = select(
    _FINE_BLOCKS.attempt, _FINE_BLOCKS.block, _FINE_BLOCKS.first_start, _FINE_BLOCKS.last_end
).where(
    _FINE_BLOCKS.run_id == bindparam("run_id"),
    _FINE_BLOCKS.rank == bindparam("rank"),
    _FINE_BLOCKS.level == FINE,
    _FINE_BLOCKS.last_end > bindparam("lo"),
    _FINE_BLOCKS.first_start < bindparam("hi"),
)


class RankReads:
    """What an ingest reads of its ranks' stored rows before it writes any: the blocking
    spans and the fine step blocks that overlap a time range. `hold(run, rank, lo, hi)`
    names a rank's whole range for the batch; the first read inside it reads the whole
    range once, and every later read inside it is answered from memory with the query's
    own filters, so exactly as the query would answer. A read outside a held range goes to
    the database. Valid only while the batch has written none of those rows."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._ranges: dict[tuple[str, int], tuple[float, float]] = {}
        self._spans: dict[tuple[str, int], _Held | None] = {}
        self._blocks: dict[tuple[str, int], list[Any]] = {}

    def hold(self, run_id: str, rank: int, lo: float, hi: float) -> None:
        key = (run_id, rank)
        if key in self._ranges:
            a, b = self._ranges[key]
            lo, hi = min(a, lo), max(b, hi)
        self._ranges[key] = (lo, hi)
        self._spans.pop(key, None)
        self._blocks.pop(key, None)

    def _held(self, key: tuple[str, int], lo: float, hi: float) -> tuple[float, float] | None:
        r = self._ranges.get(key)
        return r if r is not None and r[0] <= lo and hi <= r[1] else None

    def blocking(self, run_id: str, rank: int, lo: float, hi: float) -> list[Blocking]:
        """stored_blocking(session, run_id, rank, lo, hi)."""
        key = (run_id, rank)
        r = self._held(key, lo, hi)
        if r is None:
            return stored_blocking(self.session, run_id, rank, lo, hi)
        if key not in self._spans:
            self._spans[key] = _read_blocking(self.session, run_id, rank, *r)
        held = self._spans[key]
        if held is None:
            return []
        since = _blocking_since(lo, held.longest)
        return [s for s in held.spans if since <= s.start < hi and s.end > lo]

    def step_blocks(self, run_id: str, rank: int, lo: float, hi: float) -> list[Any]:
        """(attempt, block) of the rank's fine step blocks whose time meets (lo, hi)."""
        key = (run_id, rank)
        r = self._held(key, lo, hi)
        if r is None:
            params = {"run_id": run_id, "rank": rank, "lo": lo, "hi": hi}
            return list(core_rows(self.session, _STEP_BLOCKS_MEETING, params))
        if key not in self._blocks:
            params = {"run_id": run_id, "rank": rank, "lo": r[0], "hi": r[1]}
            self._blocks[key] = list(core_rows(self.session, _STEP_BLOCKS_MEETING, params))
        return [b for b in self._blocks[key] if b.last_end > lo and b.first_start < hi]


def stored_blocking_spans(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[SpanIn]:
    """stored_blocking, as the calculators read spans."""
    return [
        SpanIn(s.attempt, rank, s.category, s.start, s.end, False)
        for s in stored_blocking(session, run_id, rank, lo, hi)
    ]
