"""Rollups kept at ingest (service/store/ingest.py calls these), and rebuilt from the rows by
migrations and `goodput db rebuild-rollups`. Callers pass a Session; nothing here commits.

What is kept, in the same transaction as the rows it summarizes (so it never disagrees with
them, and a resent record, which is not inserted, is not counted twice):

- `steps.blocked_s`: seconds of blocking spans inside each step. Whichever of a step and a
  span arrives second adds their overlap: before a batch's rows are written, its new steps
  are measured against the stored spans and its own new spans (`blocked_of`), and its new
  spans against the stored steps (`block_stored_steps`). Each pair is counted once.
  PostgreSQL ingests of one run are serialized by a row lock on the run; SQLite has one
  writer at a time.
- `step_blocks`: per (run, rank, level, block, attempt), with block = step // level for the
  levels of ROLLUP_LEVELS: count, step time and blocked time, tokens, hook time, first start,
  last end, and the fastest and slowest step. A batch folds its steps into micro blocks,
  those into blocks of the finest level, those into the next level's, and so on
  (`_levels_up`).
- `step_micro_blocks`: per (run, rank, attempt, micro), with micro = step // MICRO_BLOCK:
  count, step time and blocked time, tokens, hook time, first start, last end.
- `span_totals`: per (run, rank, attempt, category, overlapped): count, seconds, longest,
  first start, last end.
- `span_buckets`: per (run, rank, attempt, category, bucket), with bucket = floor(start /
  SPAN_BUCKET_S), of the blocking spans: count, seconds, first start, last end.
- `routing_blocks`: per (run, rank, layer, level, block, attempt): count and the records with
  the lowest and highest MaxVio (a record without one counts as -inf).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter, itemgetter
from typing import Any, Protocol, TypeVar, cast, overload

from sqlalchemy import (
    ColumnElement,
    Row,
    Table,
    TextClause,
    and_,
    bindparam,
    case,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import SQLCoreOperations

from service.calc.goodput import SpanIn, SpanIndex, credited
from service.store import bulk
from service.store.models import (
    MICRO_BLOCK,
    ROLLUP_LEVELS,
    SPAN_BUCKET_S,
    RoutingBlock,
    RoutingRow,
    Run,
    Span,
    SpanBucket,
    SpanTotal,
    Step,
    StepBlock,
    StepMicroBlock,
)
from service.store.rollups.common import (
    FINE,
    POINT_FIELDS,
    ROLLED_ROUTING,
    ROLLED_SPAN,
    ROUTING_COLUMNS,
    STEP_COLUMNS,
    STEP_INPUT,
    Blocking,
    RankReads,
    consecutive,
    core_rows,
    grouped,
    table_of,
)

# A row laid out as STEP_COLUMNS (or at least its first eleven: STEP_INPUT) or ROUTING_COLUMNS
# (at least through POINT_FIELDS): ingest hands plain tuples, built for the bulk insert, and
# rebuild_run Rows. Read through the positions of their columns' names, so that the bulk
# paths build no object per row.
StepLike = Sequence[Any]
RoutingLike = Sequence[Any]

_RUN_ID, _ATTEMPT, _RANK, _STEP, _START, _END = map(
    STEP_COLUMNS.index, ("run_id", "attempt", "rank", "step", "start", "end")
)
_STEP_FIGURES = itemgetter(  # what a step adds to its blocks
    *map(
        STEP_COLUMNS.index,
        (
            "step",
            "start",
            "end",
            "tokens",
            "loss",
            "mem_allocated_peak",
            "hook_overhead_s",
            "device_time_s",
        ),
    )
)
_R_RUN_ID, _R_ATTEMPT, _R_RANK, _R_LAYER, _R_STEP, _R_MAX_VIO = map(
    ROUTING_COLUMNS.index, ("run_id", "attempt", "rank", "layer", "step", "max_vio")
)
_R_POINT = slice(ROUTING_COLUMNS.index(POINT_FIELDS[0]), _R_STEP + 1 + len(POINT_FIELDS))
assert ROUTING_COLUMNS[_R_POINT] == POINT_FIELDS, "ROUTING_COLUMNS: POINT_FIELDS in a row"
assert len(STEP_INPUT) == 11 and STEP_COLUMNS[:11] == tuple(c.key for c in STEP_INPUT)


class SpanLike(Protocol):
    """A span record (not stored yet) or a stored span's row: what the rollups read of it."""

    @property
    def run_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def category(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def overlapped(self) -> bool: ...


_S = TypeVar("_S", bound=SpanLike)
_SQL = SQLCoreOperations[Any]


# -- the min/max merge, written once: Python values or SQL expressions alike --


@overload
def lower_first(v: float, at: int, old: float, old_at: int) -> bool: ...
@overload
def lower_first(v: _SQL, at: _SQL, old: _SQL, old_at: _SQL) -> ColumnElement[bool]: ...
def lower_first(v: Any, at: Any, old: Any, old_at: Any) -> Any:
    """Whether (v, at) replaces (old, old_at) as a minimum: lower value, then lower step.
    `|` and `&` are `or_` and `and_` on SQL expressions (an upsert's SET), and on bools
    their plain meaning (the accumulators)."""
    return (v < old) | ((v == old) & (at < old_at))


@overload
def higher_first(v: float, at: int, old: float, old_at: int) -> bool: ...
@overload
def higher_first(v: _SQL, at: _SQL, old: _SQL, old_at: _SQL) -> ColumnElement[bool]: ...
def higher_first(v: Any, at: Any, old: Any, old_at: Any) -> Any:
    """Whether (v, at) replaces (old, old_at) as a maximum: higher value, then lower step."""
    return (v > old) | ((v == old) & (at < old_at))


def _pick(cond: ColumnElement[bool], new: _SQL, old: _SQL) -> ColumnElement[Any]:
    return case((cond, new), else_=old)


def _least(new: _SQL, old: _SQL) -> ColumnElement[Any]:
    return _pick(new < old, new, old)


def _greatest(new: _SQL, old: _SQL) -> ColumnElement[Any]:
    return _pick(new > old, new, old)


def _merged(
    new: Any, old: Any, sums: Sequence[str], lows: Sequence[str] = (), highs: Sequence[str] = ()
) -> dict[str, ColumnElement[Any]]:
    """The SET of an upsert that folds a new row into a stored one: the `sums` added, the
    `lows` the lesser, the `highs` the greater (`new`, `old`: the excluded row, the table)."""
    out: dict[str, ColumnElement[Any]] = {c: getattr(old, c) + getattr(new, c) for c in sums}
    out |= {c: _least(getattr(new, c), getattr(old, c)) for c in lows}
    out |= {c: _greatest(getattr(new, c), getattr(old, c)) for c in highs}
    return out


def lock_runs(
    session: Session,
    run_ids: Iterable[str],
    ranks: Iterable[tuple[str, int]] | None = None,
) -> None:
    """Serialize rollup upkeep, before the first read: each pair of step and span must be
    seen by exactly one of two concurrent ingests, and no key stored between a probe and its
    insert. What a batch reads and writes is its ranks' (steps, spans, rollups, attempts are
    per rank), so on PostgreSQL an ingest takes a transaction advisory lock per (run, rank)
    it writes (`ranks`), under a shared lock of each run; a writer of the whole run
    (`ranks=None`: the ml-goodput import) takes the run's lock exclusively. Ranks of one run
    then ingest side by side, and a run is no longer one transaction at a time (issue 12,
    BENCHMARKS.md). Locks are taken in one order (by key) so that batches cannot deadlock.
    Run-wide rows (the run, its tags, placeholders) rely on their own row locks (INSERT ...
    ON CONFLICT). SQLite: a write first, so this transaction holds the database's one write
    lock (its reads would otherwise run before the lock, beside another writer)."""
    ids = sorted(set(run_ids))
    if not ids:
        return
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        exclusive = ranks is None
        keys = {(_lock_key(r), -1) for r in ids}
        keys |= {(_lock_key(r), rank) for r, rank in (ranks or ())}
        ordered = sorted(keys)
        shared = tuple(sub == -1 and not exclusive for _, sub in ordered)
        params: dict[str, int] = {}
        for i, (key, sub) in enumerate(ordered):
            params[f"k{i}"], params[f"r{i}"] = key, sub
        conn.execute(_locks_statement(shared), params)  # one statement, the locks in order
    else:
        conn.execute(_TOUCH_RUNS, {"ids": ids})


_TOUCH_RUNS = (
    update(table_of(Run))
    .where(table_of(Run).c.run_id.in_(bindparam("ids", expanding=True)))
    .values(ingested_at=table_of(Run).c.ingested_at)
)


@lru_cache(maxsize=256)
def _locks_statement(shared: tuple[bool, ...]) -> TextClause:
    """One SELECT taking advisory locks (:k0, :r0), (:k1, :r1), ... in that order (a target
    list is evaluated left to right), each shared or not as `shared` says."""
    calls = [
        f"pg_advisory_xact_lock{'_shared' if s else ''}(:k{i}, :r{i})" for i, s in enumerate(shared)
    ]
    return text("SELECT " + ", ".join(calls))


def _lock_key(run_id: str) -> int:
    """A run's advisory lock key: a stable 32-bit hash of its id (two runs sharing one only
    wait for each other)."""
    digest = hashlib.blake2b(run_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def blocked_of(
    session: Session,
    steps: Sequence[StepLike],
    spans: Sequence[SpanLike],
    reads: RankReads | None = None,
) -> list[float]:
    """`blocked_s` of each step about to be inserted (rows laid out as STEP_COLUMNS): its
    overlap with the blocking spans already stored on its rank and with `spans`, the new span
    records of this batch, not yet stored. `reads`: the batch's reads of stored rows."""
    reads = reads or RankReads(session)
    out = [0.0] * len(steps)
    new = grouped((s for s in spans if not s.overlapped), lambda s: (s.run_id, s.rank))
    by_rank = grouped(range(len(steps)), lambda i: (steps[i][_RUN_ID], steps[i][_RANK]))
    for (run_id, rank), mine in by_rank.items():
        lo = min(steps[i][_START] for i in mine)
        hi = max(steps[i][_END] for i in mine)
        found = [
            SpanIn(s.attempt, rank, s.category, s.start, s.end, False)
            for s in reads.blocking(run_id, rank, lo, hi)
        ]
        found += [
            SpanIn(s.attempt, s.rank, s.category, s.start, s.end, False)
            for s in new.get((run_id, rank), [])
        ]
        if found:
            times = SpanIndex(found).overlaps([(steps[i][_START], steps[i][_END]) for i in mine])
            for i, x in zip(mine, times, strict=True):
                out[i] = x
    return out


@dataclass(slots=True)
class _StepAcc:
    n: int
    busy_s: float
    blocked_s: float
    tokens: int
    hook_s: float
    first_start: float
    last_end: float
    fast_s: float
    fast_step: int
    slow_s: float
    slow_step: int
    mem_peak: int | None
    loss_n: int
    loss_low: float | None
    loss_low_step: int | None
    loss_high: float | None
    loss_high_step: int | None
    dev_n: int
    dev_low: float | None
    dev_low_step: int | None
    dev_high: float | None
    dev_high_step: int | None

    @classmethod
    def of(cls, row: StepLike, blocked: float) -> _StepAcc:
        """One step (a row laid out as STEP_COLUMNS)."""
        step, start, end, tokens, loss, mem, hook, dev = _STEP_FIGURES(row)
        t = end - start
        at = None if loss is None else step
        dev_at = None if dev is None else step
        return cls(
            1, t, blocked, tokens, hook or 0.0, start, end, t, step, t, step, mem,
            0 if at is None else 1, loss, at, loss, at,
            0 if dev_at is None else 1, dev, dev_at, dev, dev_at,
        )  # fmt: skip

    def add(self, row: StepLike, blocked: float) -> None:
        """Fold one more step in: `merge` of `of(row, blocked)`, without building it."""
        step, start, end, tokens, loss, mem, hook, dev = _STEP_FIGURES(row)
        t = end - start
        self.n += 1
        self.busy_s += t
        self.blocked_s += blocked
        self.tokens += tokens
        self.hook_s += hook or 0.0
        if start < self.first_start:
            self.first_start = start
        if end > self.last_end:
            self.last_end = end
        # Most steps lie strictly between the extremes: those skip the merges.
        if t <= self.fast_s and lower_first(t, step, self.fast_s, self.fast_step):
            self.fast_s, self.fast_step = t, step
        if t >= self.slow_s and higher_first(t, step, self.slow_s, self.slow_step):
            self.slow_s, self.slow_step = t, step
        if mem is not None and (self.mem_peak is None or mem > self.mem_peak):
            self.mem_peak = mem
        if loss is not None:
            low, high = self.loss_low, self.loss_high
            if low is None or high is None or not low < loss < high:
                self._add_extremes(_LOSS_FIELDS, 1, loss, step, loss, step)
            else:
                self.loss_n += 1
        if dev is not None:
            low, high = self.dev_low, self.dev_high
            if low is None or high is None or not low < dev < high:
                self._add_extremes(_DEV_FIELDS, 1, dev, step, dev, step)
            else:
                self.dev_n += 1

    def merge(self, o: _StepAcc) -> _StepAcc:
        """Fold another block's figures into this one."""
        self.n += o.n
        self.busy_s += o.busy_s
        self.blocked_s += o.blocked_s
        self.tokens += o.tokens
        self.hook_s += o.hook_s
        if o.first_start < self.first_start:
            self.first_start = o.first_start
        if o.last_end > self.last_end:
            self.last_end = o.last_end
        if lower_first(o.fast_s, o.fast_step, self.fast_s, self.fast_step):
            self.fast_s, self.fast_step = o.fast_s, o.fast_step
        if higher_first(o.slow_s, o.slow_step, self.slow_s, self.slow_step):
            self.slow_s, self.slow_step = o.slow_s, o.slow_step
        if o.mem_peak is not None and (self.mem_peak is None or o.mem_peak > self.mem_peak):
            self.mem_peak = o.mem_peak
        if o.loss_n:  # a block with a loss has both extremes and their steps
            low, low_at = cast(float, o.loss_low), cast(int, o.loss_low_step)
            high, high_at = cast(float, o.loss_high), cast(int, o.loss_high_step)
            self._add_extremes(_LOSS_FIELDS, o.loss_n, low, low_at, high, high_at)
        if o.dev_n:  # likewise for device times
            low, low_at = cast(float, o.dev_low), cast(int, o.dev_low_step)
            high, high_at = cast(float, o.dev_high), cast(int, o.dev_high_step)
            self._add_extremes(_DEV_FIELDS, o.dev_n, low, low_at, high, high_at)
        return self

    def _add_extremes(
        self, names: tuple[str, ...], n: int, low: float, low_at: int, high: float, high_at: int
    ) -> None:
        """Fold in `n` values of one optional figure (its fields `names`: count, lowest and
        its step, highest and its step), the lowest and the highest at these steps."""
        count, lo, lo_at, hi, hi_at = names
        setattr(self, count, getattr(self, count) + n)
        mine = getattr(self, lo)
        if mine is None or lower_first(low, low_at, mine, getattr(self, lo_at)):
            setattr(self, lo, low)
            setattr(self, lo_at, low_at)
        mine = getattr(self, hi)
        if mine is None or higher_first(high, high_at, mine, getattr(self, hi_at)):
            setattr(self, hi, high)
            setattr(self, hi_at, high_at)


def _extreme_fields(name: str) -> tuple[str, ...]:
    return tuple(f"{name}{s}" for s in ("_n", "_low", "_low_step", "_high", "_high_step"))


_LOSS_FIELDS, _DEV_FIELDS = _extreme_fields("loss"), _extreme_fields("dev")


_STEP_ACC_FIELDS = tuple(_StepAcc.__dataclass_fields__)
_step_acc_values = attrgetter(*_STEP_ACC_FIELDS)
_A = TypeVar("_A", _StepAcc, "_Spikes")


def _levels_up(
    fine: dict[tuple[Any, ...], _A], merge: Callable[[_A, _A], _A]
) -> dict[tuple[Any, ...], _A]:
    """Blocks of every level of ROLLUP_LEVELS from the finest level's blocks, keyed
    (*prefix, level, block, attempt): each coarser block merges the finer ones inside it."""
    out = dict(fine)
    below = fine
    for level in ROLLUP_LEVELS[1:]:
        up: dict[tuple[Any, ...], _A] = {}
        for key, acc in below.items():
            *prefix, finer, block, attempt = key
            k = (*prefix, level, block * finer // level, attempt)
            have = up.get(k)
            up[k] = copy.copy(acc) if have is None else merge(have, acc)
        out.update(up)
        below = up
    return out


_STEP_BLOCK_KEY = ("run_id", "rank", "level", "block", "attempt")
_STEP_BLOCK_COLUMNS = (*_STEP_BLOCK_KEY, *_STEP_ACC_FIELDS)


def add_steps(session: Session, steps: Sequence[StepLike], blocked: Sequence[float]) -> None:
    """Fold newly inserted steps (rows laid out as STEP_COLUMNS, or at least its first eleven)
    and their `blocked_s` into step_micro_blocks, and those into step_blocks."""
    if not steps:
        return
    micro: dict[tuple[Any, ...], _StepAcc] = {}  # (run, rank, attempt, micro) -> its steps
    for row, b in zip(steps, blocked, strict=True):
        key = (row[_RUN_ID], row[_RANK], row[_ATTEMPT], row[_STEP] // MICRO_BLOCK)
        have = micro.get(key)
        if have is None:
            micro[key] = _StepAcc.of(row, b)
        else:
            have.add(row, b)
    _add_micro_blocks(session, micro)
    fine: dict[tuple[Any, ...], _StepAcc] = {}  # the finest level, from the micro blocks
    for (run_id, rank, attempt, m), acc in micro.items():
        at = (run_id, rank, FINE, m * MICRO_BLOCK // FINE, attempt)
        have = fine.get(at)
        fine[at] = copy.copy(acc) if have is None else have.merge(acc)
    blocks = _levels_up(fine, _StepAcc.merge)
    rows = [(*k, *_step_acc_values(a)) for k, a in blocks.items()]
    bulk.upsert_rows(session, _step_blocks_upsert, _STEP_BLOCK_COLUMNS, rows)


def _step_blocks_upsert(insert: Callable[[Table], Any]) -> Any:
    """step_blocks' upsert: a block's figures folded into the stored ones."""
    stmt = insert(table_of(StepBlock))
    new, old = stmt.excluded, table_of(StepBlock).c
    fast = lower_first(new.fast_s, new.fast_step, old.fast_s, old.fast_step)
    slow = higher_first(new.slow_s, new.slow_step, old.slow_s, old.slow_step)
    return stmt.on_conflict_do_update(
        index_elements=list(_STEP_BLOCK_KEY),
        set_={
            **_merged(new, old, _STEP_SUMS, ("first_start",), ("last_end",)),
            "fast_s": _pick(fast, new.fast_s, old.fast_s),
            "fast_step": _pick(fast, new.fast_step, old.fast_step),
            "slow_s": _pick(slow, new.slow_s, old.slow_s),
            "slow_step": _pick(slow, new.slow_step, old.slow_step),
            "mem_peak": _pick(
                or_(old.mem_peak.is_(None), new.mem_peak > old.mem_peak), new.mem_peak, old.mem_peak
            ),
            **_extremes_merged(new, old, "loss"),
            **_extremes_merged(new, old, "dev"),
        },
    )


def _extremes_merged(new: Any, old: Any, name: str) -> dict[str, ColumnElement[Any]]:
    """The SET of a block's count, lowest and highest of one optional figure (`loss`,
    `dev`: `<name>_n`, `<name>_low`, `<name>_low_step`, ...), NULL until one of its steps
    has it."""
    n, lo, lo_at, hi, hi_at = _extreme_fields(name)
    low = and_(
        new[lo].isnot(None),
        or_(old[lo].is_(None), lower_first(new[lo], new[lo_at], old[lo], old[lo_at])),
    )
    high = and_(
        new[hi].isnot(None),
        or_(old[hi].is_(None), higher_first(new[hi], new[hi_at], old[hi], old[hi_at])),
    )
    return {
        n: old[n] + new[n],
        lo: _pick(low, new[lo], old[lo]),
        lo_at: _pick(low, new[lo_at], old[lo_at]),
        hi: _pick(high, new[hi], old[hi]),
        hi_at: _pick(high, new[hi_at], old[hi_at]),
    }


_STEP_SUMS = ("n", "busy_s", "blocked_s", "tokens", "hook_s")  # summed per block of steps
_MICRO_KEY = ("run_id", "rank", "attempt", "micro")
_MICRO_FIGURES = ("n", "busy_s", "blocked_s", "tokens", "hook_s", "first_start", "last_end")
_micro_values = attrgetter(*_MICRO_FIGURES)


def _add_micro_blocks(session: Session, micro: dict[tuple[Any, ...], _StepAcc]) -> None:
    """Fold newly inserted steps, summed per (run, rank, attempt, micro block), into
    step_micro_blocks."""
    rows = [(*k, *_micro_values(a)) for k, a in micro.items()]
    bulk.upsert_rows(session, _micro_blocks_upsert, (*_MICRO_KEY, *_MICRO_FIGURES), rows)


def _micro_blocks_upsert(insert: Callable[[Table], Any]) -> Any:
    stmt = insert(table_of(StepMicroBlock))
    return stmt.on_conflict_do_update(
        index_elements=list(_MICRO_KEY),
        set_=_merged(
            stmt.excluded, table_of(StepMicroBlock).c, _STEP_SUMS, ("first_start",), ("last_end",)
        ),
    )


_SPAN_TOTAL_KEY = ("run_id", "rank", "attempt", "category", "overlapped")
_SPAN_TOTAL_FIGURES = ("n", "total_s", "longest_s", "first_start", "last_end", "correction_s")


def add_spans(
    session: Session, spans: Sequence[SpanLike], charged: Sequence[float | None] | None = None
) -> None:
    """Fold newly inserted spans (rows or records with run_id, attempt, rank, category,
    start, end, overlapped) into span_totals; `charged[i]`: what flag_clashes charged a
    clashing span (None: all of it; rows may carry it as `charged_s`); and the blocking ones
    into span_buckets."""
    if not spans:
        return
    acc: dict[tuple[Any, ...], list[Any]] = {}  # the key -> _SPAN_TOTAL_FIGURES
    buckets: dict[tuple[Any, ...], list[Any]] = {}  # the key -> _SPAN_BUCKET_FIGURES
    for i, s in enumerate(spans):
        run_id, rank, attempt, category = s.run_id, s.rank, s.attempt, s.category
        start, end, overlapped = s.start, s.end, bool(s.overlapped)
        key = (run_id, rank, attempt, category, overlapped)
        d = end - start
        c = charged[i] if charged is not None else getattr(s, "charged_s", None)
        fix = 0.0 if c is None else c - d
        a = acc.get(key)
        if a is None:
            acc[key] = [1, d, d, start, end, fix]
        else:
            a[0] += 1
            a[1] += d
            a[2] = max(a[2], d)
            a[3] = min(a[3], start)
            a[4] = max(a[4], end)
            a[5] += fix
        if overlapped:  # span_buckets hold the blocking spans, clashing or not
            continue
        bucket = (run_id, rank, attempt, category, math.floor(start / SPAN_BUCKET_S))
        a = buckets.get(bucket)
        if a is None:
            buckets[bucket] = [1, d, start, end]
        else:
            a[0] += 1
            a[1] += d
            if start < a[2]:
                a[2] = start
            if end > a[3]:
                a[3] = end
    _add_span_buckets(session, buckets)
    rows = [(*k, *a) for k, a in acc.items()]
    bulk.upsert_rows(session, _span_totals_upsert, (*_SPAN_TOTAL_KEY, *_SPAN_TOTAL_FIGURES), rows)


def _span_totals_upsert(insert: Callable[[Table], Any]) -> Any:
    stmt = insert(table_of(SpanTotal))
    return stmt.on_conflict_do_update(
        index_elements=list(_SPAN_TOTAL_KEY),
        set_=_merged(
            stmt.excluded,
            table_of(SpanTotal).c,
            ("n", "total_s", "correction_s"),
            ("first_start",),
            ("longest_s", "last_end"),
        ),
    )


_SPAN_BUCKET_KEY = ("run_id", "rank", "attempt", "category", "bucket")
_SPAN_BUCKET_FIGURES = ("n", "total_s", "first_start", "last_end")


def _add_span_buckets(session: Session, buckets: dict[tuple[Any, ...], list[Any]]) -> None:
    """Fold newly inserted blocking spans, summed per (run, rank, attempt, category,
    bucket), into span_buckets (a span's bucket does not move when a later span clashes with
    it: the readers take the clashing spans out themselves)."""
    if not buckets:
        return
    rows = [(*k, *a) for k, a in buckets.items()]
    bulk.upsert_rows(
        session, _span_buckets_upsert, (*_SPAN_BUCKET_KEY, *_SPAN_BUCKET_FIGURES), rows
    )


def _span_buckets_upsert(insert: Callable[[Table], Any]) -> Any:
    stmt = insert(table_of(SpanBucket))
    return stmt.on_conflict_do_update(
        index_elements=list(_SPAN_BUCKET_KEY),
        set_=_merged(
            stmt.excluded, table_of(SpanBucket).c, ("n", "total_s"), ("first_start",), ("last_end",)
        ),
    )


def flag_clashes(
    session: Session, spans: Sequence[SpanLike], reads: RankReads | None = None
) -> tuple[list[bool], list[float | None]]:
    """Whether each new span (records not yet stored) shares time with another blocking span
    of its rank, stored or new, and the seconds charged to it if so. The stored spans it
    shares time with are flagged and charged anew here, and their span_totals' correction
    moved: span_totals alone give each category's seconds charged by precedence. `reads`:
    the batch's reads of stored rows (a rank's are not read again once it is charged)."""
    reads = reads or RankReads(session)
    flags: list[bool] = [False] * len(spans)
    charged: list[float | None] = [None] * len(spans)
    mine = [i for i, s in enumerate(spans) if not s.overlapped]
    for (run_id, rank), idx in grouped(mine, lambda i: (spans[i].run_id, spans[i].rank)).items():
        new = sorted(idx, key=lambda i: spans[i].start)
        lo, hi = spans[new[0]].start, max(spans[i].end for i in new)
        hit: list[Blocking] = []
        for s in reads.blocking(run_id, rank, lo, hi):
            clash = [i for i in new if spans[i].start < s.end and s.start < spans[i].end]
            for i in clash:
                flags[i] = True
            if clash:
                hit.append(s)
        reach, last = -math.inf, -1  # new spans against each other, in start order
        for i in new:
            if spans[i].start < reach:
                flags[i] = flags[last] = True
            if spans[i].end > reach:
                reach, last = spans[i].end, i
        clashing = [i for i in new if flags[i]]
        if not clashing:
            continue
        a = min([spans[i].start for i in clashing] + [s.start for s in hit])
        b = max([spans[i].end for i in clashing] + [s.end for s in hit])
        stored = reads.blocking(run_id, rank, a, b)
        every = [SpanIn(s.attempt, rank, s.category, s.start, s.end, False) for s in stored]
        every += [
            SpanIn(spans[i].attempt, rank, spans[i].category, spans[i].start, spans[i].end, False)
            for i in new
        ]
        credit = {
            (s.attempt, s.category, s.start): x
            for s, x in zip(every, credited(every, a, b), strict=True)
        }
        for i in clashing:
            charged[i] = credit.get((spans[i].attempt, spans[i].category, spans[i].start), 0.0)
        _recharge(session, run_id, rank, hit, credit)
    return flags, charged


def _recharge(
    session: Session,
    run_id: str,
    rank: int,
    hit: list[Blocking],
    credit: dict[tuple[int, str, float], float],
) -> None:
    """Flag the stored spans that a new span clashes with, charge them anew, and move their
    span_totals' correction by the change."""
    if not hit:
        return
    moves: dict[tuple[int, str], float] = {}
    rows = []
    for s in hit:
        now = credit.get((s.attempt, s.category, s.start), 0.0)
        before = s.charged_s if s.charged_s is not None else s.end - s.start
        moves[s.attempt, s.category] = moves.get((s.attempt, s.category), 0.0) + now - before
        rows.append({"at": s.attempt, "cat": s.category, "st": s.start, "c": now})
    t = table_of(Span).c
    session.execute(
        update(table_of(Span))
        .where(
            t.run_id == run_id,
            t.attempt == bindparam("at"),
            t.rank == rank,
            t.category == bindparam("cat"),
            t.start == bindparam("st"),
        )
        .values(clashes=True, charged_s=bindparam("c")),
        rows,
    )
    totals = table_of(SpanTotal).c
    session.execute(
        update(table_of(SpanTotal))
        .where(
            totals.run_id == run_id,
            totals.rank == rank,
            totals.attempt == bindparam("at"),
            totals.category == bindparam("cat"),
            totals.overlapped.is_(False),
        )
        .values(correction_s=totals.correction_s + bindparam("d")),
        [{"at": a, "cat": c, "d": d} for (a, c), d in moves.items()],
    )


def block_stored_steps(
    session: Session, spans: Sequence[SpanLike], reads: RankReads | None = None
) -> None:
    """Measure again the blocked time of the stored steps that new blocking spans (records
    not yet stored) touch: the union of every blocking span of the rank inside the step,
    stored or new. Their step_blocks move by the same amounts. Run before this batch's steps
    are inserted, which `blocked_of` measures against these spans instead."""
    reads = reads or RankReads(session)
    blocking = [s for s in spans if not s.overlapped]
    for (run_id, rank), mine in grouped(blocking, lambda s: (s.run_id, s.rank)).items():
        _block_stored_steps(reads, run_id, rank, mine)


def steps_overlapping(
    reads: RankReads, run_id: str, rank: int, lo: float, hi: float, *extra: _SQL
) -> list[Row[Any]]:
    """The rank's stored steps (any attempt) that overlap (lo, hi), as rows of attempt,
    step, start, end and the `extra` columns: found through the fine blocks whose time span
    meets the interval (ix_step_blocks_last_end), then by key, a run of blocks at a time."""
    session = reads.session
    candidates = reads.step_blocks(run_id, rank, lo, hi)
    out: list[Row[Any]] = []
    for attempt, blocks in grouped(candidates, lambda c: c.attempt).items():
        for first, last in consecutive(sorted(c.block for c in blocks)):
            stmt = select(Step.attempt, Step.step, Step.start, Step.end, *extra).where(
                Step.run_id == run_id,
                Step.attempt == attempt,
                Step.rank == rank,
                Step.step.between(first * FINE, (last + 1) * FINE - 1),
                Step.start < hi,
                Step.end > lo,
            )
            out += core_rows(session, stmt).all()
    return out


def _block_stored_steps(reads: RankReads, run_id: str, rank: int, spans: list[_S]) -> None:
    session = reads.session
    lo, hi = min(s.start for s in spans), max(s.end for s in spans)
    rows = steps_overlapping(reads, run_id, rank, lo, hi, Step.blocked_s)
    if not rows:
        return
    new = [SpanIn(s.attempt, s.rank, s.category, s.start, s.end, False) for s in spans]
    hit = SpanIndex(new).overlaps([(r.start, r.end) for r in rows])
    touched = [r for r, x in zip(rows, hit, strict=True) if x > 0]
    if not touched:
        return
    reach = (min(r.start for r in touched), max(r.end for r in touched))
    stored = [
        SpanIn(s.attempt, rank, s.category, s.start, s.end, False)
        for s in reads.blocking(run_id, rank, *reach)
    ]
    index = SpanIndex(stored + new)
    blocked = index.overlaps([(r.start, r.end) for r in touched])
    added = [  # attempt, step, the seconds added
        (r.attempt, r.step, x - r.blocked_s)
        for r, x in zip(touched, blocked, strict=True)
        if x != r.blocked_s
    ]
    if not added:
        return
    steps = table_of(Step).c
    session.execute(
        update(table_of(Step))
        .where(
            steps.run_id == run_id,
            steps.attempt == bindparam("at"),
            steps.rank == rank,
            steps.step == bindparam("st"),
        )
        .values(blocked_s=steps.blocked_s + bindparam("x")),
        [{"at": attempt, "st": step, "x": x} for attempt, step, x in added],
    )
    per_block: dict[tuple[int, int, int], float] = {}  # (level, block, attempt) -> seconds
    for attempt, step, x in added:
        for level in ROLLUP_LEVELS:
            key = (level, step // level, attempt)
            per_block[key] = per_block.get(key, 0.0) + x
    cols = table_of(StepBlock).c
    session.execute(
        update(table_of(StepBlock))
        .where(
            cols.run_id == run_id,
            cols.rank == rank,
            cols.level == bindparam("lv"),
            cols.block == bindparam("bk"),
            cols.attempt == bindparam("at"),
        )
        .values(blocked_s=cols.blocked_s + bindparam("x")),
        [{"lv": lv, "bk": bk, "at": at, "x": x} for (lv, bk, at), x in per_block.items()],
    )
    per_micro: dict[tuple[int, int], float] = {}  # (attempt, micro block) -> seconds
    for attempt, step, x in added:
        at = (attempt, step // MICRO_BLOCK)
        per_micro[at] = per_micro.get(at, 0.0) + x
    micro = table_of(StepMicroBlock).c
    session.execute(
        update(table_of(StepMicroBlock))
        .where(
            micro.run_id == run_id,
            micro.rank == rank,
            micro.attempt == bindparam("at"),
            micro.micro == bindparam("mc"),
        )
        .values(blocked_s=micro.blocked_s + bindparam("x")),
        [{"at": at, "mc": mc, "x": x} for (at, mc), x in per_micro.items()],
    )


class _Spikes:
    """A routing block's count and its records of lowest and highest MaxVio (-inf for none),
    each with its step and point (the POINT_FIELDS of the record)."""

    __slots__ = ("n", "low", "low_step", "low_point", "high", "high_step", "high_point")

    def __init__(self, n: int, v: float, step: int, point: tuple[Any, ...]) -> None:
        self.n = n
        self.low, self.low_step, self.low_point = v, step, point
        self.high, self.high_step, self.high_point = v, step, point

    def merge(self, o: _Spikes) -> _Spikes:
        self.n += o.n
        if lower_first(o.low, o.low_step, self.low, self.low_step):
            self.low, self.low_step, self.low_point = o.low, o.low_step, o.low_point
        if higher_first(o.high, o.high_step, self.high, self.high_step):
            self.high, self.high_step, self.high_point = o.high, o.high_step, o.high_point
        return self


_ROUTING_BLOCK_KEY = ("run_id", "rank", "layer", "level", "block", "attempt")


def add_routing(session: Session, rows: Sequence[RoutingLike]) -> None:
    """Fold newly inserted routing rows (laid out as ROUTING_COLUMNS, or at least its first
    5 + len(POINT_FIELDS): run_id, attempt, rank, layer, step, then POINT_FIELDS) into
    routing_blocks."""
    if not rows:
        return
    fine: dict[tuple[Any, ...], _Spikes] = {}
    for r in rows:
        step, v = r[_R_STEP], r[_R_MAX_VIO]
        if v is None:
            v = -math.inf
        key = (r[_R_RUN_ID], r[_R_RANK], r[_R_LAYER], FINE, step // FINE, r[_R_ATTEMPT])
        have = fine.get(key)
        if have is None:
            fine[key] = _Spikes(1, v, step, tuple(r[_R_POINT]))
            continue
        have.n += 1  # as have.merge(_Spikes(1, v, step, point)), without building it
        if v <= have.low and lower_first(v, step, have.low, have.low_step):
            have.low, have.low_step, have.low_point = v, step, tuple(r[_R_POINT])
        if v >= have.high and higher_first(v, step, have.high, have.high_step):
            have.high, have.high_step, have.high_point = v, step, tuple(r[_R_POINT])
    acc = _levels_up(fine, _Spikes.merge)
    values = [
        (*k, a.n, a.low, a.low_step, a.high, a.high_step, *a.low_point, *a.high_point)
        for k, a in acc.items()
    ]
    bulk.upsert_rows(session, _routing_blocks_upsert, _ROUTING_BLOCK_COLUMNS, values)


_ROUTING_BLOCK_COLUMNS = (
    *_ROUTING_BLOCK_KEY,
    *("n", "low", "low_step", "high", "high_step"),
    *(f"low_{f}" for f in POINT_FIELDS),
    *(f"high_{f}" for f in POINT_FIELDS),
)


def _routing_blocks_upsert(insert: Callable[[Table], Any]) -> Any:
    stmt = insert(table_of(RoutingBlock))
    new, old = stmt.excluded, table_of(RoutingBlock).c
    low = lower_first(new.low, new.low_step, old.low, old.low_step)
    high = higher_first(new.high, new.high_step, old.high, old.high_step)
    set_: dict[str, ColumnElement[Any]] = {"n": old.n + new.n}
    for side, wins in (("low", low), ("high", high)):
        for col in (side, f"{side}_step", *(f"{side}_{f}" for f in POINT_FIELDS)):
            set_[col] = _pick(wins, new[col], old[col])
    return stmt.on_conflict_do_update(index_elements=list(_ROUTING_BLOCK_KEY), set_=set_)


# -- rebuilding (migration 0004 fills the rollups of rows stored before it) --


_CHUNK = 50_000


def rebuild_run(session: Session, run_id: str) -> None:
    """Recompute every rollup of one run from its rows, as if they had just been ingested."""
    for model in (StepBlock, StepMicroBlock, SpanTotal, SpanBucket, RoutingBlock):
        table = table_of(model)
        session.execute(table.delete().where(table.c.run_id == run_id))
    add_spans(
        session,
        session.execute(select(*ROLLED_SPAN, Span.charged_s).where(Span.run_id == run_id)).all(),
    )
    after: tuple[int, int, int] = (-1, -1, -1)
    key = tuple_(Step.attempt, Step.rank, Step.step)
    table = table_of(Step)
    while True:  # steps after spans: each step is measured against every stored span
        chunk = session.execute(
            select(*STEP_INPUT)
            .where(Step.run_id == run_id, key > tuple_(*map(literal, after)))
            .order_by(Step.attempt, Step.rank, Step.step)
            .limit(_CHUNK)
        ).all()
        if not chunk:
            break
        after = (chunk[-1].attempt, chunk[-1].rank, chunk[-1].step)
        blocked = blocked_of(session, chunk, [])
        session.execute(
            update(table)
            .where(
                table.c.run_id == run_id,
                table.c.attempt == bindparam("at"),
                table.c.rank == bindparam("rk"),
                table.c.step == bindparam("st"),
            )
            .values(blocked_s=bindparam("b")),
            [
                {"at": r.attempt, "rk": r.rank, "st": r.step, "b": b}
                for r, b in zip(chunk, blocked, strict=True)
            ],
        )
        add_steps(session, chunk, blocked)
    add_routing(
        session, session.execute(select(*ROLLED_ROUTING).where(RoutingRow.run_id == run_id)).all()
    )


def missing_rollups(session: Session) -> list[str]:
    """The runs that hold records but no rollups: stored before revision 0004 made the
    rollup tables (migrations do not run service code, so `migrate.upgrade` builds them)."""
    found = session.execute(
        text(
            "SELECT run_id FROM runs r WHERE NOT EXISTS "
            "(SELECT 1 FROM step_blocks b WHERE b.run_id = r.run_id) "
            "AND NOT EXISTS (SELECT 1 FROM span_totals t WHERE t.run_id = r.run_id) "
            "AND NOT EXISTS (SELECT 1 FROM routing_blocks g WHERE g.run_id = r.run_id) "
            "AND (EXISTS (SELECT 1 FROM steps s WHERE s.run_id = r.run_id) "
            "OR EXISTS (SELECT 1 FROM spans p WHERE p.run_id = r.run_id) "
            "OR EXISTS (SELECT 1 FROM routing g WHERE g.run_id = r.run_id)) "
            "ORDER BY run_id"
        )
    )
    return list(found.scalars())


def rebuild_all(session: Session) -> int:
    """rebuild_run for every run; returns how many runs."""
    run_ids = session.scalars(select(Run.run_id)).all()
    for run_id in run_ids:
        rebuild_run(session, run_id)
    return len(run_ids)
