"""Rollups: aggregates kept at ingest so that a run of a million steps answers its goodput
summary and its downsampled series from a few hundred rows. Part of the repository (all SQL
lives here, in repository.py and in repository_bulk.py); callers pass a Session and nothing
here commits.

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
  last end, and the fastest and slowest step. A batch folds its steps into blocks of the
  finest level, those into the next level's, and so on (`_levels_up`).
- `span_totals`: per (run, rank, attempt, category, overlapped): count, seconds, longest,
  first start, last end.
- `routing_blocks`: per (run, rank, layer, level, block, attempt): count and the records with
  the lowest and highest MaxVio (a record without one counts as -inf).

Reads split any step range into whole blocks of the coarsest level that fits, finer blocks at
its edges, and raw rows for what is left (fewer than 64 step numbers at each end).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Row,
    Table,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.calc.downsample import bucket_plan, pick
from service.calc.goodput import (
    ROUNDING_SLACK_S,
    AttemptIn,
    AttemptSplit,
    CompileCut,
    Decided,
    Interval,
    RankParts,
    SpanIn,
    SpanIndex,
    StepIn,
    credited,
    inferred_compile,
)
from service.calc.step_stats import RECENT_STEPS, STRAGGLER_STEPS
from service.store.models import (
    ROLLUP_LEVELS,
    Attempt,
    Base,
    CheckpointCommit,
    ExcludedWindow,
    RoutingBlock,
    RoutingRow,
    Run,
    Span,
    SpanTotal,
    Step,
    StepBlock,
)

COARSE, FINE = max(ROLLUP_LEVELS), min(ROLLUP_LEVELS)


DESCENDING = tuple(sorted(ROLLUP_LEVELS, reverse=True))
_NEG_INF = -math.inf

# The columns each part reads, named once.
STEP_IN_COLUMNS = (  # service.calc.goodput.StepIn's fields, in order
    Step.attempt,
    Step.rank,
    Step.step,
    Step.start,
    Step.end,
    Step.tokens,
    Step.loss,
    Step.hook_overhead_s,
    Step.flops,
    Step.device_time_s,
)
_STEP_INPUT = (  # what add_steps reads of a step, besides its blocked_s
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
_POINT_COLUMNS = tuple(getattr(RoutingRow, f) for f in POINT_FIELDS)
ROLLED_ROUTING = (
    RoutingRow.run_id,
    RoutingRow.attempt,
    RoutingRow.rank,
    RoutingRow.layer,
    RoutingRow.step,
    *_POINT_COLUMNS,
)
ROUTING_POINT = (RoutingRow.layer, RoutingRow.step, RoutingRow.attempt, *_POINT_COLUMNS)

# Rows as the bulk inserts write them (repository_bulk): what the rollups read comes first.
STEP_COLUMNS = (
    *(c.key for c in _STEP_INPUT),
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


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _rows(session: Session, stmt: Any) -> Any:
    """Run a read on the session's connection: Core rows, without the ORM's per-row work."""
    return session.connection().execute(stmt)


def _insert(session: Session, model: type[Base]) -> Any:
    ins = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return ins(_table(model))


def _lower(new: Any, old: Any, new_step: Any, old_step: Any) -> Any:
    """SQL: the new (value, step) comes before the stored one (lower value, then lower step)."""
    return or_(new < old, and_(new == old, new_step < old_step))


def _higher(new: Any, old: Any, new_step: Any, old_step: Any) -> Any:
    """SQL: the new (value, step) wins a maximum (higher value, then lower step)."""
    return or_(new > old, and_(new == old, new_step < old_step))


def _pick(cond: Any, new: Any, old: Any) -> Any:
    return case((cond, new), else_=old)


# -- kept at ingest --


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
    if session.get_bind().dialect.name == "postgresql":
        exclusive = ranks is None
        keys = {(_lock_key(r), -1) for r in ids}
        keys |= {(_lock_key(r), rank) for r, rank in (ranks or ())}
        for key, sub in sorted(keys):
            run_level_shared = sub == -1 and not exclusive
            fn = "pg_advisory_xact_lock_shared" if run_level_shared else "pg_advisory_xact_lock"
            session.execute(text(f"SELECT {fn}(:k, :r)"), {"k": key, "r": sub})
    else:
        session.execute(
            update(_table(Run))
            .where(_table(Run).c.run_id.in_(ids))
            .values(ingested_at=Run.ingested_at)
        )


def _lock_key(run_id: str) -> int:
    """A run's advisory lock key: a stable 32-bit hash of its id (two runs sharing one only
    wait for each other)."""
    digest = hashlib.blake2b(run_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def blocked_of(session: Session, steps: Sequence[Any], spans: Sequence[Any]) -> list[float]:
    """`blocked_s` of each step about to be inserted (rows laid out as STEP_COLUMNS): its
    overlap with the blocking spans already stored on its rank and with `spans`, the new span
    records of this batch, not yet stored."""
    out = [0.0] * len(steps)
    new = _group((s for s in spans if not s.overlapped), lambda s: (s.run_id, s.rank))
    by_rank = _group(range(len(steps)), lambda i: (steps[i][0], steps[i][2]))
    for (run_id, rank), mine in by_rank.items():
        lo = min(steps[i][4] for i in mine)
        hi = max(steps[i][5] for i in mine)
        found = _stored_blocking_spans(session, run_id, rank, lo, hi)
        found += [
            SpanIn(s.attempt, s.rank, s.category, s.start, s.end, False)
            for s in new.get((run_id, rank), [])
        ]
        if found:
            times = SpanIndex(found).overlaps([(steps[i][4], steps[i][5]) for i in mine])
            for i, x in zip(mine, times, strict=True):
                out[i] = x
    return out


def _stored_blocking_spans(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[SpanIn]:
    """Blocking spans of the rank that overlap [lo, hi], through the spans' primary key."""
    return [
        SpanIn(s.attempt, rank, s.category, s.start, s.end, False)
        for s in _stored_blocking(session, run_id, rank, lo, hi)
    ]


def _stored_blocking(
    session: Session, run_id: str, rank: int, lo: float, hi: float
) -> list[_Blocking]:
    totals = session.execute(
        select(SpanTotal.attempt, SpanTotal.category, SpanTotal.longest_s).where(
            SpanTotal.run_id == run_id, SpanTotal.rank == rank, SpanTotal.overlapped.is_(False)
        )
    ).all()
    if not totals:
        return []
    longest = max(t.longest_s for t in totals)
    stmt = select(Span.attempt, Span.category, Span.start, Span.end, Span.charged_s).where(
        Span.run_id == run_id,
        Span.attempt.in_(sorted({t.attempt for t in totals})),
        Span.rank == rank,
        Span.category.in_(sorted({t.category for t in totals})),
        Span.start >= lo - longest - ROUNDING_SLACK_S,
        Span.start < hi,
        Span.end > lo,
        Span.overlapped.is_(False),
    )
    return [_Blocking(*row) for row in _rows(session, stmt)]


def _group(rows: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
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

    @classmethod
    def of(cls, row: Sequence[Any], blocked: float) -> _StepAcc:
        """One step (a row laid out as STEP_COLUMNS)."""
        _, _, _, step, start, end, tokens, loss, mem, hook = row[:10]
        t = end - start
        at = None if loss is None else step
        return cls(
            1, t, blocked, tokens, hook or 0.0, start, end, t, step, t, step, mem,
            0 if at is None else 1, loss, at, loss, at,
        )  # fmt: skip

    def add(self, row: Sequence[Any], blocked: float) -> None:
        """Fold one more step in: `merge` of `of(row, blocked)`, without building it."""
        _, _, _, step, start, end, tokens, loss, mem, hook = row[:10]
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
        if (t, step) < (self.fast_s, self.fast_step):
            self.fast_s, self.fast_step = t, step
        if t > self.slow_s or (t == self.slow_s and step < self.slow_step):
            self.slow_s, self.slow_step = t, step
        if mem is not None and (self.mem_peak is None or mem > self.mem_peak):
            self.mem_peak = mem
        if loss is not None:
            self.loss_n += 1
            low, low_at = self.loss_low, self.loss_low_step or 0
            if low is None or (loss, step) < (low, low_at):
                self.loss_low, self.loss_low_step = loss, step
            high, high_at = self.loss_high, self.loss_high_step or 0
            if high is None or loss > high or (loss == high and step < high_at):
                self.loss_high, self.loss_high_step = loss, step

    def merge(self, o: _StepAcc) -> None:
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
        if (o.fast_s, o.fast_step) < (self.fast_s, self.fast_step):
            self.fast_s, self.fast_step = o.fast_s, o.fast_step
        if o.slow_s > self.slow_s or (o.slow_s == self.slow_s and o.slow_step < self.slow_step):
            self.slow_s, self.slow_step = o.slow_s, o.slow_step
        if o.mem_peak is not None and (self.mem_peak is None or o.mem_peak > self.mem_peak):
            self.mem_peak = o.mem_peak
        if o.loss_n:
            self.loss_n += o.loss_n
            # A block with a loss has both extremes and their steps.
            low, low_at = cast(float, o.loss_low), cast(int, o.loss_low_step)
            high, high_at = cast(float, o.loss_high), cast(int, o.loss_high_step)
            if self.loss_low is None or (low, low_at) < (self.loss_low, self.loss_low_step or 0):
                self.loss_low, self.loss_low_step = low, low_at
            mine, mine_at = self.loss_high, self.loss_high_step or 0
            if mine is None or high > mine or (high == mine and high_at < mine_at):
                self.loss_high, self.loss_high_step = high, high_at


_STEP_ACC_FIELDS = _StepAcc.__dataclass_fields__.keys()


def _levels_up(fine: dict[tuple[Any, ...], Any], merge: Callable[[Any, Any], Any]) -> dict:
    """Blocks of every level of ROLLUP_LEVELS from the finest level's blocks, keyed
    (*prefix, level, block, attempt): each coarser block merges the finer ones inside it."""
    out = dict(fine)
    below = fine
    for level in ROLLUP_LEVELS[1:]:
        up: dict[tuple[Any, ...], Any] = {}
        for key, acc in below.items():
            *prefix, finer, block, attempt = key
            k = (*prefix, level, block * finer // level, attempt)
            have = up.get(k)
            up[k] = copy.copy(acc) if have is None else merge(have, acc)
        out.update(up)
        below = up
    return out


def add_steps(session: Session, steps: Sequence[Sequence[Any]], blocked: Sequence[float]) -> None:
    """Fold newly inserted steps (rows laid out as STEP_COLUMNS, or at least its first ten)
    and their `blocked_s` into step_blocks."""
    if not steps:
        return
    fine: dict[tuple[Any, ...], _StepAcc] = {}
    for row, b in zip(steps, blocked, strict=True):
        key = (row[0], row[2], FINE, row[3] // FINE, row[1])
        have = fine.get(key)
        if have is None:
            fine[key] = _StepAcc.of(row, b)
        else:
            have.add(row, b)
    blocks = _levels_up(fine, lambda a, b: a.merge(b) or a)
    rows = [
        {"run_id": k[0], "rank": k[1], "level": k[2], "block": k[3], "attempt": k[4]}
        | {f: getattr(a, f) for f in _STEP_ACC_FIELDS}
        for k, a in blocks.items()
    ]
    stmt = _insert(session, StepBlock)
    new, old = stmt.excluded, StepBlock
    fast = _lower(new.fast_s, old.fast_s, new.fast_step, old.fast_step)
    slow = _higher(new.slow_s, old.slow_s, new.slow_step, old.slow_step)
    # A block's loss extremes are NULL until one of its steps has a loss.
    loss_low = and_(
        new.loss_low.isnot(None),
        or_(
            old.loss_low.is_(None),
            _lower(new.loss_low, old.loss_low, new.loss_low_step, old.loss_low_step),
        ),
    )
    loss_high = and_(
        new.loss_high.isnot(None),
        or_(
            old.loss_high.is_(None),
            _higher(new.loss_high, old.loss_high, new.loss_high_step, old.loss_high_step),
        ),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "rank", "level", "block", "attempt"],
        set_={
            "n": old.n + new.n,
            "busy_s": old.busy_s + new.busy_s,
            "blocked_s": old.blocked_s + new.blocked_s,
            "tokens": old.tokens + new.tokens,
            "hook_s": old.hook_s + new.hook_s,
            "first_start": _pick(
                new.first_start < old.first_start, new.first_start, old.first_start
            ),
            "last_end": _pick(new.last_end > old.last_end, new.last_end, old.last_end),
            "fast_s": _pick(fast, new.fast_s, old.fast_s),
            "fast_step": _pick(fast, new.fast_step, old.fast_step),
            "slow_s": _pick(slow, new.slow_s, old.slow_s),
            "slow_step": _pick(slow, new.slow_step, old.slow_step),
            "mem_peak": _pick(
                or_(old.mem_peak.is_(None), new.mem_peak > old.mem_peak), new.mem_peak, old.mem_peak
            ),
            "loss_n": old.loss_n + new.loss_n,
            "loss_low": _pick(loss_low, new.loss_low, old.loss_low),
            "loss_low_step": _pick(loss_low, new.loss_low_step, old.loss_low_step),
            "loss_high": _pick(loss_high, new.loss_high, old.loss_high),
            "loss_high_step": _pick(loss_high, new.loss_high_step, old.loss_high_step),
        },
    )
    session.execute(stmt, rows)


def add_spans(
    session: Session, spans: Sequence[Any], charged: Sequence[float | None] | None = None
) -> None:
    """Fold newly inserted spans (rows or records with run_id, attempt, rank, category,
    start, end, overlapped) into span_totals; `charged[i]`: what flag_clashes charged a
    clashing span (None: all of it; rows may carry it as `charged_s`)."""
    if not spans:
        return
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for i, s in enumerate(spans):
        key = (s.run_id, s.rank, s.attempt, s.category, bool(s.overlapped))
        d = s.end - s.start
        c = charged[i] if charged is not None else getattr(s, "charged_s", None)
        fix = 0.0 if c is None else c - d
        a = acc.get(key)
        if a is None:
            acc[key] = [1, d, d, s.start, s.end, fix]
        else:
            a[0] += 1
            a[1] += d
            a[2] = max(a[2], d)
            a[3] = min(a[3], s.start)
            a[4] = max(a[4], s.end)
            a[5] += fix
    names = ("run_id", "rank", "attempt", "category", "overlapped")
    fields = ("n", "total_s", "longest_s", "first_start", "last_end", "correction_s")
    rows = [
        {**dict(zip(names, k, strict=True)), **dict(zip(fields, a, strict=True))}
        for k, a in acc.items()
    ]
    stmt = _insert(session, SpanTotal)
    new, old = stmt.excluded, SpanTotal
    stmt = stmt.on_conflict_do_update(
        index_elements=list(names),
        set_={
            "n": old.n + new.n,
            "total_s": old.total_s + new.total_s,
            "longest_s": _pick(new.longest_s > old.longest_s, new.longest_s, old.longest_s),
            "first_start": _pick(
                new.first_start < old.first_start, new.first_start, old.first_start
            ),
            "last_end": _pick(new.last_end > old.last_end, new.last_end, old.last_end),
            "correction_s": old.correction_s + new.correction_s,
        },
    )
    session.execute(stmt, rows)


class _Blocking(NamedTuple):
    """A stored blocking span of one rank, with the seconds charged to it if it clashes."""

    attempt: int
    category: str
    start: float
    end: float
    charged_s: float | None


def flag_clashes(session: Session, spans: Sequence[Any]) -> tuple[list[bool], list[float | None]]:
    """Whether each new span (records not yet stored) shares time with another blocking span
    of its rank, stored or new, and the seconds charged to it if so. The stored spans it
    shares time with are flagged and charged anew here, and their span_totals' correction
    moved: span_totals alone give each category's seconds charged by precedence."""
    flags: list[bool] = [False] * len(spans)
    charged: list[float | None] = [None] * len(spans)
    mine = [i for i, s in enumerate(spans) if not s.overlapped]
    for (run_id, rank), idx in _group(mine, lambda i: (spans[i].run_id, spans[i].rank)).items():
        new = sorted(idx, key=lambda i: spans[i].start)
        lo, hi = spans[new[0]].start, max(spans[i].end for i in new)
        hit: list[_Blocking] = []
        for s in _stored_blocking(session, run_id, rank, lo, hi):
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
        stored = _stored_blocking(session, run_id, rank, a, b)
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
    session: Session, run_id: str, rank: int, hit: list[_Blocking], credit: dict[Any, float]
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
    t = _table(Span).c
    session.execute(
        update(_table(Span))
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
    totals = _table(SpanTotal).c
    session.execute(
        update(_table(SpanTotal))
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


def block_stored_steps(session: Session, spans: Sequence[Any]) -> None:
    """Measure again the blocked time of the stored steps that new blocking spans (records
    not yet stored) touch: the union of every blocking span of the rank inside the step,
    stored or new. Their step_blocks move by the same amounts. Run before this batch's steps
    are inserted, which `blocked_of` measures against these spans instead."""
    blocking = [s for s in spans if not s.overlapped]
    for (run_id, rank), mine in _group(blocking, lambda s: (s.run_id, s.rank)).items():
        _block_stored_steps(session, run_id, rank, mine)


def steps_overlapping(
    session: Session, run_id: str, rank: int, lo: float, hi: float, *extra: Any
) -> list[Any]:
    """The rank's stored steps (any attempt) that overlap (lo, hi), as rows of attempt,
    step, start, end and the `extra` columns: found through the fine blocks whose time span
    meets the interval (ix_step_blocks_last_end), then by key, a run of blocks at a time."""
    candidates = session.execute(
        select(StepBlock.attempt, StepBlock.block).where(
            StepBlock.run_id == run_id,
            StepBlock.rank == rank,
            StepBlock.level == FINE,
            StepBlock.last_end > lo,
            StepBlock.first_start < hi,
        )
    ).all()
    out: list[Any] = []
    for attempt, blocks in _group(candidates, lambda c: c.attempt).items():
        for first, last in _runs(sorted(c.block for c in blocks)):
            stmt = select(Step.attempt, Step.step, Step.start, Step.end, *extra).where(
                Step.run_id == run_id,
                Step.attempt == attempt,
                Step.rank == rank,
                Step.step.between(first * FINE, (last + 1) * FINE - 1),
                Step.start < hi,
                Step.end > lo,
            )
            out += _rows(session, stmt).all()
    return out


def _block_stored_steps(session: Session, run_id: str, rank: int, spans: list[Any]) -> None:
    lo, hi = min(s.start for s in spans), max(s.end for s in spans)
    rows = steps_overlapping(session, run_id, rank, lo, hi, Step.blocked_s)
    if not rows:
        return
    new = [SpanIn(s.attempt, s.rank, s.category, s.start, s.end, False) for s in spans]
    hit = SpanIndex(new).overlaps([(r.start, r.end) for r in rows])
    touched: list[tuple[int, int, float, float, float]] = [  # attempt, step, start, end, old
        (r.attempt, r.step, r.start, r.end, r.blocked_s)
        for r, x in zip(rows, hit, strict=True)
        if x > 0
    ]
    if not touched:
        return
    reach = (min(t[2] for t in touched), max(t[3] for t in touched))
    index = SpanIndex(_stored_blocking_spans(session, run_id, rank, *reach) + new)
    blocked = index.overlaps([(t[2], t[3]) for t in touched])
    added: list[dict[str, Any]] = [
        {"attempt": t[0], "step": t[1], "x": x - t[4]}
        for t, x in zip(touched, blocked, strict=True)
        if x != t[4]
    ]
    if not added:
        return
    steps = _table(Step).c
    session.execute(
        update(_table(Step))
        .where(
            steps.run_id == run_id,
            steps.attempt == bindparam("at"),
            steps.rank == rank,
            steps.step == bindparam("st"),
        )
        .values(blocked_s=steps.blocked_s + bindparam("x")),
        [{"at": a["attempt"], "st": a["step"], "x": a["x"]} for a in added],
    )
    per_block: dict[tuple[int, int, int], float] = {}
    for a in added:
        for level in ROLLUP_LEVELS:
            key = (level, a["step"] // level, a["attempt"])
            per_block[key] = per_block.get(key, 0.0) + a["x"]
    cols = _table(StepBlock).c
    session.execute(
        update(_table(StepBlock))
        .where(
            cols.run_id == run_id,
            cols.rank == rank,
            cols.level == bindparam("lv"),
            cols.block == bindparam("bk"),
            cols.attempt == bindparam("at"),
        )
        .values(blocked_s=cols.blocked_s + bindparam("x")),
        [{"lv": k[0], "bk": k[1], "at": k[2], "x": x} for k, x in per_block.items()],
    )


def _runs(sorted_values: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last), ...] of sorted integers."""
    out: list[tuple[int, int]] = []
    for v in sorted_values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _spike(v: float | None) -> float:
    return _NEG_INF if v is None else v


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
        if (o.low, o.low_step) < (self.low, self.low_step):
            self.low, self.low_step, self.low_point = o.low, o.low_step, o.low_point
        if o.high > self.high or (o.high == self.high and o.high_step < self.high_step):
            self.high, self.high_step, self.high_point = o.high, o.high_step, o.high_point
        return self


_MAX_VIO_AT = 5 + POINT_FIELDS.index("max_vio")


def add_routing(session: Session, rows: Sequence[Sequence[Any]]) -> None:
    """Fold newly inserted routing rows (laid out as ROUTING_COLUMNS, or at least its first
    5 + len(POINT_FIELDS): run_id, attempt, rank, layer, step, then POINT_FIELDS) into
    routing_blocks."""
    if not rows:
        return
    fine: dict[tuple[Any, ...], _Spikes] = {}
    end = 5 + len(POINT_FIELDS)
    for r in rows:
        step, v = r[4], _spike(r[_MAX_VIO_AT])
        key = (r[0], r[2], r[3], FINE, step // FINE, r[1])
        have = fine.get(key)
        if have is None:
            fine[key] = _Spikes(1, v, step, tuple(r[5:end]))
            continue
        have.n += 1  # as have.merge(_Spikes(1, v, step, point)), without building it
        if (v, step) < (have.low, have.low_step):
            have.low, have.low_step, have.low_point = v, step, tuple(r[5:end])
        if v > have.high or (v == have.high and step < have.high_step):
            have.high, have.high_step, have.high_point = v, step, tuple(r[5:end])
    acc = _levels_up(fine, _Spikes.merge)
    names = ("run_id", "rank", "layer", "level", "block", "attempt")  # the key, in any order
    values = []
    for k, a in acc.items():
        row = dict(zip(names, k, strict=True))
        row.update(n=a.n, low=a.low, low_step=a.low_step, high=a.high, high_step=a.high_step)
        row.update({f"low_{f}": v for f, v in zip(POINT_FIELDS, a.low_point, strict=True)})
        row.update({f"high_{f}": v for f, v in zip(POINT_FIELDS, a.high_point, strict=True)})
        values.append(row)
    stmt = _insert(session, RoutingBlock)
    new, old = stmt.excluded, cast(Any, RoutingBlock)
    low = _lower(new.low, old.low, new.low_step, old.low_step)
    high = _higher(new.high, old.high, new.high_step, old.high_step)
    set_ = {"n": old.n + new.n}
    for side, wins in (("low", low), ("high", high)):
        for col in (side, f"{side}_step", *(f"{side}_{f}" for f in POINT_FIELDS)):
            set_[col] = _pick(wins, new[col], getattr(old, col))
    session.execute(stmt.on_conflict_do_update(index_elements=list(names), set_=set_), values)


# -- reads --


def decompose(lo: int, hi: int, levels: Sequence[int] = DESCENDING) -> tuple[list, list]:
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


def _busy_split(
    session: Session, run_id: str, rank: int, attempt: int, coarse: list[Any], upto: float
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
        for busy, n in session.execute(
            select(func.sum(Step.end - Step.start - Step.blocked_s), func.count()).where(
                Step.run_id == run_id,
                Step.attempt == attempt,
                Step.rank == rank,
                Step.step.between(lo, hi),
            )
        ):
            after += busy or 0.0
            n_after += n
    total = sum(b.busy_s - b.blocked_s for b in coarse)
    return AttemptSplit(total - after, after, n_after)


def _max_block_end(coarse: list[Any]) -> int:
    return max(((b.block + 1) * COARSE - 1 for b in coarse), default=-1)


def _blocks_of(
    session: Session,
    run_id: str,
    rank: int,
    attempt: int | None,
    ranges: list[tuple[int, int, int]],
) -> list[Any]:
    out: list[Any] = []
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
    coarse: dict[int, dict[int, list[Any]]]  # rank -> attempt -> coarse StepBlock rows
    blocking: dict[int, dict[str, float]]  # rank -> category -> seconds, by precedence
    with_compile: set[tuple[int, int]]  # (attempt, rank) that sent compile spans
    excluded: list[Interval]

    @property
    def ranks(self) -> list[int]:
        return sorted({r for _, r in self.life} | {a.rank for a in self.rows})


def attempt_rows(session: Session, run_id: str) -> list[AttemptIn]:
    """The run's attempt rows, as the accounting reads them."""
    stmt = select(
        Attempt.attempt,
        Attempt.rank,
        Attempt.start,
        Attempt.end,
        Attempt.status,
        Attempt.last_seen,
        Attempt.cause,
        Attempt.heartbeat_s,
    ).where(Attempt.run_id == run_id)
    return [AttemptIn(*row) for row in _rows(session, stmt.order_by(Attempt.attempt, Attempt.rank))]


def saved_checkpoints(session: Session, run_id: str) -> dict[int, int]:
    """Each attempt's last successful checkpoint's step: all the accounting reads of them (a
    run may have thousands), one row per attempt."""
    stmt = (
        select(CheckpointCommit.attempt, func.max(CheckpointCommit.step))
        .where(CheckpointCommit.run_id == run_id, CheckpointCommit.ok.is_(True))
        .group_by(CheckpointCommit.attempt)
    )
    return dict(_rows(session, stmt).tuples().all())


def record_life(session: Session, run_id: str) -> dict[tuple[int, int], tuple[float, float]]:
    """Per (attempt, rank): the earliest start and the latest sign of life among its steps,
    spans (blocking or overlapped) and checkpoint commits."""
    out: dict[tuple[int, int], tuple[float, float]] = {}
    c = CheckpointCommit
    queries = [
        select(
            StepBlock.attempt,
            StepBlock.rank,
            func.min(StepBlock.first_start),
            func.max(StepBlock.last_end),
        )
        .where(StepBlock.run_id == run_id, StepBlock.level == COARSE)
        .group_by(StepBlock.attempt, StepBlock.rank),
        select(
            SpanTotal.attempt,
            SpanTotal.rank,
            func.min(SpanTotal.first_start),
            func.max(SpanTotal.last_end),
        )
        .where(SpanTotal.run_id == run_id)
        .group_by(SpanTotal.attempt, SpanTotal.rank),
        select(c.attempt, c.rank, func.min(c.time), func.max(c.time))
        .where(c.run_id == run_id)
        .group_by(c.attempt, c.rank),
    ]
    for stmt in queries:
        for attempt, rank, first, last in _rows(session, stmt):
            lo, hi = out.get((attempt, rank), (math.inf, -math.inf))
            out[attempt, rank] = (min(lo, first), max(hi, last))
    return out


# Through the partial index ix_spans_clashes. SQLite uses a partial index only for a WHERE that
# names its condition, and without statistics it prefers the primary key (which reads every
# span of the run), so on SQLite the statement names the index (SQLAlchemy renders no table
# hints for SQLite).
_CLASHING_SQLITE = text(
    'SELECT attempt, rank, category, start, "end", overlapped FROM spans '
    "INDEXED BY ix_spans_clashes WHERE run_id = :run_id AND clashes"
)
_CLASHING = select(
    Span.attempt, Span.rank, Span.category, Span.start, Span.end, Span.overlapped
).where(Span.run_id == bindparam("run_id"), text("spans.clashes"))


def clashing_spans(session: Session, run_id: str) -> list[SpanIn]:
    """The run's blocking spans that share time with another (few; through their index)."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    stmt = _CLASHING_SQLITE if sqlite else _CLASHING
    return [SpanIn(*row) for row in _rows(session, stmt.params(run_id=run_id))]


def excluded_windows(session: Session, run_id: str) -> list[Interval]:
    stmt = select(ExcludedWindow.start, ExcludedWindow.end).where(ExcludedWindow.run_id == run_id)
    return [Interval(*row) for row in _rows(session, stmt)]


def run_rollup(session: Session, run_id: str) -> RunRollup:
    coarse_rows = (
        session.execute(
            select(StepBlock).where(StepBlock.run_id == run_id, StepBlock.level == COARSE)
        )
        .scalars()
        .all()
    )
    coarse: dict[int, dict[int, list[Any]]] = {}
    for b in coarse_rows:
        coarse.setdefault(b.rank, {}).setdefault(b.attempt, []).append(b)
    totals = session.execute(
        select(
            SpanTotal.rank,
            SpanTotal.attempt,
            SpanTotal.category,
            SpanTotal.overlapped,
            SpanTotal.total_s + SpanTotal.correction_s,
        ).where(SpanTotal.run_id == run_id)
    ).all()
    blocking: dict[int, dict[str, float]] = {}
    for rank, _, category, overlapped, seconds in totals:
        if not overlapped:
            mine = blocking.setdefault(rank, {})
            mine[category] = mine.get(category, 0.0) + seconds
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


def first_steps(session: Session, run_id: str, keys: Iterable[tuple[int, int]]) -> list[Any]:
    """The first step (lowest number) of each (attempt, rank), with its blocked time."""
    out = []
    for attempt, rank in keys:
        row = _rows(
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
            _stored_blocking_spans(session, roll.run_id, s.rank, s.start, s.end)
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
        times += _rows(session, stmt).scalars().all()
    return times[::-1]


# -- the records of a time window --


# -- rebuilding (migration 0004 fills the rollups of rows stored before it) --


_CHUNK = 50_000


def rebuild_run(session: Session, run_id: str) -> None:
    """Recompute every rollup of one run from its rows, as if they had just been ingested."""
    for model in (StepBlock, SpanTotal, RoutingBlock):
        table = _table(model)
        session.execute(table.delete().where(table.c.run_id == run_id))
    add_spans(
        session,
        session.execute(select(*ROLLED_SPAN, Span.charged_s).where(Span.run_id == run_id)).all(),
    )
    after: tuple[int, int, int] = (-1, -1, -1)
    key = tuple_(Step.attempt, Step.rank, Step.step)
    table = _table(Step)
    while True:  # steps after spans: each step is measured against every stored span
        chunk = session.execute(
            select(*_STEP_INPUT)
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


# -- downsampled series: per bucket of step numbers, the rows with the lowest and the highest
# value (ties: the lowest step, then attempt), read from blocks where a bucket holds them --


@dataclass(frozen=True)
class _Series:
    blocks: type[Base]  # StepBlock or RoutingBlock
    rows: type[Base]  # Step or RoutingRow
    count: str  # block column: rows of the block in this series
    low: tuple[str, str]  # block columns: lowest value and its step
    high: tuple[str, str]
    value: Any  # the raw rows' value expression
    present: Any = None  # the raw rows in this series (None: all)


_STEP_SERIES = _Series(
    StepBlock, Step, "n", ("fast_s", "fast_step"), ("slow_s", "slow_step"), Step.end - Step.start
)
_LOSS_SERIES = _Series(
    StepBlock,
    Step,
    "loss_n",
    ("loss_low", "loss_low_step"),
    ("loss_high", "loss_high_step"),
    Step.loss,
    Step.loss.isnot(None),
)
_ROUTING_SERIES = _Series(
    RoutingBlock,
    RoutingRow,
    "n",
    ("low", "low_step"),
    ("high", "high_step"),
    func.coalesce(RoutingRow.max_vio, _NEG_INF),
)


class SeriesPick(NamedTuple):
    total: int  # rows in [lo, hi]
    keys: list[tuple[int, int]] | None  # (step, attempt) of the rows kept; None: every row
    values: dict[tuple[int, int], Any] | None = None  # each kept row's value, with keys


def _downsample(
    session: Session,
    spec: _Series,
    where_blocks: list[Any],
    where_rows: list[Any],
    lo: int,
    hi: int,
    max_points: int,
) -> SeriesPick:
    """Which rows of [lo, hi] a downsampled series keeps."""
    if lo > hi:
        return SeriesPick(0, [])
    b, r = cast(Any, spec.blocks), cast(Any, spec.rows)
    count = getattr(b, spec.count)
    present = [] if spec.present is None else [spec.present]
    width, level = bucket_plan(lo, hi, max_points, ROLLUP_LEVELS)  # buckets of whole blocks
    if level == 1:  # the picks would read every row: count from blocks first, read rows once
        total = _count(session, spec, where_blocks, [*where_rows, *present], lo, hi)
        if total <= max_points:
            return SeriesPick(total, None)
    blocks, raw = decompose(lo, hi, tuple(lv for lv in DESCENDING if lv <= level))
    cols = (count, b.attempt, b.level, b.block, *(getattr(b, c) for c in (*spec.low, *spec.high)))
    candidates: list[tuple[int, float, int, int]] = []  # (bucket, value, step, attempt)
    total = 0
    for lv, first, last in blocks:
        stmt = select(*cols).where(
            *where_blocks, b.level == lv, b.block.between(first, last), count > 0
        )
        for n, attempt, lv_, block, low, low_step, high, high_step in _rows(session, stmt):
            total += n
            bucket = block * lv_ // width
            candidates += [(bucket, low, low_step, attempt), (bucket, high, high_step, attempt)]
    for first, last in raw:
        stmt = select(r.step, r.attempt, spec.value).where(
            *where_rows, *present, r.step.between(first, last)
        )
        for step, attempt, value in _rows(session, stmt):
            total += 1
            candidates.append((step // width, value, step, attempt))
    if total <= max_points:
        return SeriesPick(total, None)
    values = {(step, attempt): value for _, value, step, attempt in candidates}
    return SeriesPick(total, pick(candidates), values)


def _count(
    session: Session,
    spec: _Series,
    where_blocks: list[Any],
    where_rows: list[Any],
    lo: int,
    hi: int,
) -> int:
    """Rows of [lo, hi]: block counts over the coarsest cover, raw counts at its edges."""
    b, r = cast(Any, spec.blocks), cast(Any, spec.rows)
    count = getattr(b, spec.count)
    blocks, raw = decompose(lo, hi)
    total = 0
    for lv, first, last in blocks:
        total += int(  # PostgreSQL sums bigints as numeric
            session.scalar(
                select(func.coalesce(func.sum(count), 0)).where(
                    *where_blocks, b.level == lv, b.block.between(first, last)
                )
            )
            or 0
        )
    for first, last in raw:
        total += (
            session.scalar(select(func.count()).where(*where_rows, r.step.between(first, last)))
            or 0
        )
    return total


def _attempts_with(session: Session, spec: _Series, where_blocks: list[Any]) -> list[int]:
    b = cast(Any, spec.blocks)
    stmt = select(b.attempt).where(*where_blocks, b.level == COARSE).group_by(b.attempt)
    return sorted(session.scalars(stmt).all())


def step_series(
    session: Session,
    run_id: str,
    rank: int,
    start_step: int | None,
    end_step: int | None,
    max_points: int,
    *,
    metric: str = "step_time_s",
    columns: Sequence[Any] | None = None,
    metric_only: bool = False,
) -> tuple[int, list[Any]]:
    """(steps in the range, the kept rows ordered by step then attempt): rows of `columns`
    (default STEP_IN_COLUMNS), buckets keeping the extremes of `metric` (STEP_METRICS; a loss
    series holds the steps that have a loss). `metric_only`: the columns are (step, attempt,
    the metric's value)."""
    spec = STEP_METRICS[metric]
    where_blocks = [StepBlock.run_id == run_id, StepBlock.rank == rank]
    attempts = _attempts_with(session, spec, where_blocks)
    if not attempts:
        return 0, []
    where_rows = [Step.run_id == run_id, Step.attempt.in_(attempts), Step.rank == rank]
    lo, hi = start_step, end_step
    if lo is None or hi is None:
        bounds = _bounds(session, _STEP_SERIES, where_blocks, where_rows)
        if bounds is None:
            return 0, []
        lo = bounds[0] if lo is None else lo
        hi = bounds[1] if hi is None else hi
    pick = _downsample(session, spec, where_blocks, where_rows, lo, hi, max_points)
    if metric_only and pick.keys is not None and pick.values is not None:
        # The blocks' extremes carry their values: no second read of the kept rows.
        return pick.total, [(s, a, pick.values[s, a]) for s, a in pick.keys]
    where = [*where_rows, *([] if spec.present is None else [spec.present])]
    rows = _fetch(session, Step, columns or STEP_IN_COLUMNS, where, lo, hi, pick.keys)
    return pick.total, rows


STEP_METRICS = {"step_time_s": _STEP_SERIES, "loss": _LOSS_SERIES}


def metric_series(
    session: Session,
    run_id: str,
    rank: int,
    metric: str,
    start_step: int | None,
    end_step: int | None,
    max_points: int,
) -> tuple[int, list[Any]]:
    """One scalar of STEP_METRICS as (step, attempt, value) rows, downsampled on it."""
    columns = (Step.step, Step.attempt, STEP_METRICS[metric].value)
    return step_series(
        session,
        run_id,
        rank,
        start_step,
        end_step,
        max_points,
        metric=metric,
        columns=columns,
        metric_only=True,
    )


def _fetch(
    session: Session,
    model: Any,
    columns: Sequence[Any],
    where: list[Any],
    lo: int,
    hi: int,
    keys: list[tuple[int, int]] | None,
) -> list[Row[Any]]:
    stmt = select(*columns).where(*where)
    if keys is None:
        return list(
            _rows(
                session, stmt.where(model.step.between(lo, hi)).order_by(model.step, model.attempt)
            ).all()
        )
    # By step numbers (an IN on one indexed column: SQLite looks each up in the key, where a
    # row-value IN would scan the range), then exactly the wanted (step, attempt) pairs.
    wanted = set(keys)
    steps = sorted({step for step, _ in keys})
    rows: list[Row[Any]] = []
    for i in range(0, len(steps), _KEYS_PER_QUERY):  # bound parameters stay under SQLite's limit
        part = stmt.where(model.step.in_(steps[i : i + _KEYS_PER_QUERY]))
        for row in _rows(session, part.order_by(model.step, model.attempt)):
            if (row.step, row.attempt) in wanted:
                rows.append(row)
    return rows


_KEYS_PER_QUERY = 4000


class LayerSeries(NamedTuple):
    total: int  # records of the layer in the range
    rows: list[Any]  # the kept ones, by step then attempt: (layer, step, attempt, *figures)
    newest_attempt: int  # the newest attempt with records of the layer


def routing_series(
    session: Session,
    run_id: str,
    rank: int,
    layer: int | None,
    max_points: int,
) -> dict[int, LayerSeries]:
    """Per E layer (every layer, or `layer`), its routing records downsampled by MaxVio. The
    layers share one step range (lowest to highest step of any of them) and so one set of
    buckets; each statement covers every layer. Rows are ROUTING_POINT: (layer, step,
    attempt, *POINT_FIELDS); the kept records' figures come from the blocks (or the rows read
    at the range's edges), with no second read."""
    where_blocks = [RoutingBlock.run_id == run_id, RoutingBlock.rank == rank]
    if layer is not None:
        where_blocks.append(RoutingBlock.layer == layer)
    attempts_by_layer: dict[int, list[int]] = {}
    stmt = (
        select(RoutingBlock.layer, RoutingBlock.attempt)
        .where(*where_blocks, RoutingBlock.level == COARSE)
        .group_by(RoutingBlock.layer, RoutingBlock.attempt)
    )
    for n, attempt in _rows(session, stmt):
        attempts_by_layer.setdefault(n, []).append(attempt)
    del stmt
    if not attempts_by_layer:
        return {}
    layers = sorted(attempts_by_layer)
    attempts = sorted({a for v in attempts_by_layer.values() for a in v})
    where_blocks = [*where_blocks[:2], RoutingBlock.layer.in_(layers)]
    where_rows = [
        RoutingRow.run_id == run_id,
        RoutingRow.attempt.in_(attempts),
        RoutingRow.rank == rank,
        RoutingRow.layer.in_(layers),
    ]
    bounds = _bounds(session, _ROUTING_SERIES, where_blocks, where_rows)
    if bounds is None:
        return {}
    lo, hi = bounds
    width, level = bucket_plan(lo, hi, max_points, ROLLUP_LEVELS)
    blocks, raw = decompose(lo, hi, tuple(lv for lv in DESCENDING if lv <= level))
    totals = dict.fromkeys(layers, 0)
    candidates: dict[int, list[tuple[int, float, int, int]]] = {n: [] for n in layers}
    points: dict[tuple[int, int, int], tuple[Any, ...]] = {}  # (layer, step, attempt) -> figures
    b = cast(Any, RoutingBlock)
    sides = [getattr(b, f"{side}_{f}") for side in ("low", "high") for f in POINT_FIELDS]
    cols = (b.layer, b.n, b.attempt, b.level, b.block, b.low, b.low_step, b.high, b.high_step)
    lows, highs = slice(9, 9 + len(POINT_FIELDS)), slice(9 + len(POINT_FIELDS), None)
    for lv, first, last in blocks:
        found = select(*cols, *sides).where(
            *where_blocks, b.level == lv, b.block.between(first, last)
        )
        for row in _rows(session, found).all():  # thousands of rows for every layer: lean
            n, count, attempt, _, block, low, low_step, high, high_step = row[:9]
            totals[n] += count
            bucket = block * lv // width
            found_n = candidates[n]
            found_n.append((bucket, low, low_step, attempt))
            found_n.append((bucket, high, high_step, attempt))
            points[n, low_step, attempt] = row[lows]
            points[n, high_step, attempt] = row[highs]
    value = func.coalesce(RoutingRow.max_vio, _NEG_INF)
    for first, last in raw:
        edge = select(*ROUTING_POINT[:3], value, *_POINT_COLUMNS).where(
            *where_rows, RoutingRow.step.between(first, last)
        )
        for n, step, attempt, v, *fig in _rows(session, edge).all():
            totals[n] += 1
            candidates[n].append((step // width, v, step, attempt))
            points[(n, step, attempt)] = tuple(fig)
    every = [n for n in layers if totals[n] <= max_points]
    rows: dict[int, list[Any]] = {}
    if every:
        rows = _fetch_routing(session, where_rows, lo, hi, every)
    for n in layers:
        if n not in every:  # the kept records' figures came with the candidates
            rows[n] = [(n, s, a, *points[(n, s, a)]) for s, a in pick(candidates[n])]
    return {n: LayerSeries(totals[n], rows.get(n, []), max(attempts_by_layer[n])) for n in layers}


def _bounds(
    session: Session, spec: _Series, where_blocks: list[Any], where_rows: list[Any]
) -> tuple[int, int] | None:
    """Lowest and highest step of the series (over every layer the filters admit): the end
    coarse block, the end fine block inside it, then at most FINE step numbers of rows; no
    scan of the series, and one statement (each end a chain of scalar subqueries)."""
    b, r = cast(Any, spec.blocks), cast(Any, spec.rows)
    ends = []
    for agg in (func.min, func.max):
        first: Any = None  # the end block found so far: its first step number, its size
        size = 0
        for level in DESCENDING:
            stmt = select(agg(b.block)).where(*where_blocks, b.level == level)
            if first is not None:
                stmt = stmt.where(b.block.between(first // level, (first + size - 1) // level))
            first, size = stmt.scalar_subquery() * level, level
        ends.append(
            select(agg(r.step))
            .where(*where_rows, r.step.between(first, first + size - 1))
            .scalar_subquery()
        )
    lo, hi = session.execute(select(*ends)).one()
    return None if lo is None or hi is None else (int(lo), int(hi))


def _fetch_routing(
    session: Session,
    where_rows: list[Any],
    lo: int,
    hi: int,
    layers: list[int],
) -> dict[int, list[Any]]:
    """Every row of [lo, hi] of these layers, by layer."""
    out: dict[int, list[Any]] = {}
    stmt = (
        select(*ROUTING_POINT)
        .where(*where_rows, RoutingRow.layer.in_(layers), RoutingRow.step.between(lo, hi))
        .order_by(RoutingRow.step, RoutingRow.attempt)
    )
    for row in _rows(session, stmt).all():
        out.setdefault(row.layer, []).append(row)
    return out


class RankSums(NamedTuple):
    steps: int
    tokens: int
    busy_s: float  # sum of end - start


def rank_step_sums(session: Session, run_id: str) -> dict[int, RankSums]:
    """Per rank: step count, tokens and step time, from the coarse blocks."""
    b = StepBlock
    stmt = (
        select(b.rank, func.sum(b.n), func.sum(b.tokens), func.sum(b.busy_s))
        .where(b.run_id == run_id, b.level == COARSE)
        .group_by(b.rank)
    )
    return {r: RankSums(int(n), int(t), float(busy)) for r, n, t, busy in _rows(session, stmt)}


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
    return [StepIn(*row) for row in _rows(session, stmt).all()][::-1]


def _step_attempts(session: Session, run_id: str, rank: int) -> list[int]:
    """The rank's attempts with steps, ascending."""
    where = [StepBlock.run_id == run_id, StepBlock.rank == rank]
    return _attempts_with(session, _STEP_SERIES, where)
