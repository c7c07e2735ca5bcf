"""Reads: runs, attempts, steps, receipts' parts, exports. Callers pass a Session; nothing
here writes."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    and_,
    case,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy import Text as SAText
from sqlalchemy.orm import Session, aliased

from service.calc.goodput import STALL_INTERVALS, CheckpointIn, GoodputInputs, SpanIn, StepIn
from service.calc.receipts import ObservationIn
from service.importers.mgm import StoredRun
from service.store.models import (
    Attempt,
    CheckpointCommit,
    ExcludedWindow,
    Observation,
    RoutingRow,
    Run,
    RunTag,
    Span,
    SpanTotal,
    Step,
    StepBlock,
)
from service.store.rollups import common as rollup_common
from service.store.rollups import read as rollup_read
from service.store.rollups import write as rollup_write
from trainer_hooks.records import (
    ID_PATTERN,
)


@dataclass(frozen=True)
class Cursor:
    created_at: float
    run_id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.run_id]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, run_id = json.loads(raw)
            cursor = cls(float(created_at), str(run_id))
        except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise ValueError("cursor is not one this server issued") from exc
        # Only what a run row can hold: a NUL, say, would fail the query on PostgreSQL (a 500).
        if not (math.isfinite(cursor.created_at) and re.match(ID_PATTERN, cursor.run_id)):
            raise ValueError("cursor is not one this server issued")
        return cursor


RunStatus = Literal["running", "completed", "failed", "stalled"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)


def _status_clause(status: str, now: float) -> ColumnElement[bool]:
    """A run's status in SQL, as goodput.attempt_statuses derives it for its newest attempt:
    failed on any rank, else completed on any rank, else stalled (heartbeats silent for
    STALL_INTERVALS declared intervals at `now`), else running."""
    other = aliased(Attempt)  # the max() runs over its own copy of attempts, per run
    last = (
        select(func.max(other.attempt))
        .where(other.run_id == Run.run_id)
        .correlate(Run)
        .scalar_subquery()
    )
    of_last = and_(Attempt.run_id == Run.run_id, Attempt.attempt == last)

    def newest(column: Any) -> Any:
        return select(func.max(column)).where(of_last).correlate(Run).scalar_subquery()

    failed = exists().where(of_last, Attempt.status == "failed")
    completed = exists().where(of_last, Attempt.status == "completed")
    interval, seen = newest(Attempt.heartbeat_s), newest(Attempt.last_seen)
    stalled = and_(
        ~failed,
        ~completed,
        interval.is_not(None),
        seen.is_not(None),
        seen < now - STALL_INTERVALS * interval,
    )
    if status == "failed":
        return failed
    if status == "completed":
        return and_(~failed, completed)
    if status == "stalled":
        return stalled
    return and_(~failed, ~completed, ~stalled)


def _readable_json(session: Session, column: Any) -> ColumnElement[bool]:
    """Whether the database can read the stored JSON `column`: false for values stored before
    the contract refused NUL and NaN in JSON fields (PostgreSQL's ->> raises on a json value
    holding \\u0000 and SQLite's json_extract on NaN, for every row scanned)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.strpos(column.cast(SAText), "\\u0000") == 0
    return func.json_valid(column) == 1


def plan_pattern(session: Session) -> ColumnElement[Any]:
    """The plan's "pattern" (model_plan.pattern), NULL where the stored plan is unreadable
    as JSON (`_readable_json`)."""
    value = Run.model_plan["pattern"].as_string()
    return case((_readable_json(session, Run.model_plan), value), else_=None)


def policy_lane(session: Session) -> ColumnElement[Any]:
    """The dispatch lane the run asked for (runtime_policy.dispatch_requested: grouped,
    padded, loop, auto...), NULL where the stored policy is unreadable as JSON."""
    value = Run.runtime_policy["dispatch_requested"].as_string()
    return case((_readable_json(session, Run.runtime_policy), value), else_=None)


def list_runs(
    session: Session,
    *,
    name: str | None = None,
    project: str | None = None,
    status: str | None = None,
    pattern: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    cursor: Cursor | None = None,
    name_contains: str | None = None,
    lane: str | None = None,
    created_from: float | None = None,
    created_to: float | None = None,
) -> tuple[list[Run], Cursor | None]:
    """Newest first, keyset-paginated on (created_at, run_id). `name` is the exact name,
    `name_contains` a substring of it (any case); `lane` the requested dispatch
    (runtime_policy.dispatch_requested); created_from <= created_at < created_to."""
    stmt: Select[tuple[Run]] = select(Run)
    if name is not None:
        stmt = stmt.where(Run.name == name)
    if name_contains is not None:
        stmt = stmt.where(func.lower(Run.name).contains(name_contains.lower(), autoescape=True))
    if lane is not None:
        stmt = stmt.where(policy_lane(session) == lane)
    if created_from is not None:
        stmt = stmt.where(Run.created_at >= created_from)
    if created_to is not None:
        stmt = stmt.where(Run.created_at < created_to)
    if project is not None:
        stmt = stmt.where(Run.project == project)
    if status is not None:
        stmt = stmt.where(_status_clause(status, time.time()))
    if pattern is not None:
        stmt = stmt.where(plan_pattern(session) == pattern)
    if tag is not None:
        stmt = stmt.where(exists().where(RunTag.run_id == Run.run_id, RunTag.tag == tag))
    if cursor is not None:
        stmt = stmt.where(
            or_(
                Run.created_at < cursor.created_at,
                and_(Run.created_at == cursor.created_at, Run.run_id < cursor.run_id),
            )
        )
    stmt = stmt.order_by(Run.created_at.desc(), Run.run_id.desc()).limit(limit + 1)
    runs = list(session.scalars(stmt))
    nxt = Cursor(runs[limit - 1].created_at, runs[limit - 1].run_id) if len(runs) > limit else None
    return runs[:limit], nxt


def ping(engine: Engine) -> None:
    """Raise if the database cannot answer a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def tags_of(session: Session, run_ids: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    rows = session.execute(select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(run_ids)))
    for run_id, tag in rows:
        out.setdefault(run_id, []).append(tag)
    return {k: sorted(v) for k, v in out.items()}


def get_run(session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def attempts_of(session: Session, run_ids: Sequence[str]) -> list[Attempt]:
    stmt = select(Attempt).where(Attempt.run_id.in_(run_ids))
    return list(session.scalars(stmt.order_by(Attempt.run_id, Attempt.attempt, Attempt.rank)))


def count_steps(session: Session, run_id: str) -> int:
    """Step rows of the run (every rank and attempt), summed from the coarse step blocks."""
    stmt = select(func.sum(StepBlock.n)).where(
        StepBlock.run_id == run_id, StepBlock.level == rollup_common.COARSE
    )
    return int(session.scalar(stmt) or 0)


def goodput_inputs(session: Session, run_id: str) -> GoodputInputs:
    """Every record the goodput calculator reads, as plain data: its definition on the raw
    rows, which the tests hold the rollups (store/rollups/) and the window sums
    (store/rollups/windows.py) to."""
    attempts = rollup_read.attempt_rows(session, run_id)
    c = CheckpointCommit
    commits = session.execute(
        select(c.attempt, c.step, c.ok, c.rank, c.time).where(c.run_id == run_id)
    )
    checkpoints = [CheckpointIn(*row) for row in commits]
    steps = [
        StepIn(*row)
        for row in session.execute(
            select(*rollup_common.STEP_IN_COLUMNS).where(Step.run_id == run_id)
        )
    ]
    spans = [
        SpanIn(*row) for row in session.execute(select(*_SPAN_IN).where(Span.run_id == run_id))
    ]
    return GoodputInputs(
        attempts=attempts,
        steps=steps,
        spans=spans,
        checkpoints=checkpoints,
        excluded=rollup_read.excluded_windows(session, run_id),
    )


_SPAN_IN = (Span.attempt, Span.rank, Span.category, Span.start, Span.end, Span.overlapped)


# -- metrics --
# Queries behind /metrics (service/services/metrics.py): one statement each for many runs at once.


def recent_step_totals(
    session: Session, run_ids: Sequence[str], last: int = 20
) -> dict[str, tuple[int, float]]:
    """Per run: (tokens, seconds of step time) summed over rank 0's `last` newest steps (the
    newest attempt's first). Runs without rank-0 steps are absent."""
    if not run_ids:
        return {}
    newest = (Step.attempt.desc(), Step.step.desc())
    ranked = (
        select(
            Step.run_id,
            Step.tokens,
            (Step.end - Step.start).label("seconds"),
            func.row_number().over(partition_by=Step.run_id, order_by=newest).label("n"),
        )
        .where(Step.run_id.in_(run_ids), Step.rank == 0)
        .subquery()
    )
    stmt = (
        select(ranked.c.run_id, func.sum(ranked.c.tokens), func.sum(ranked.c.seconds))
        .where(ranked.c.n <= last)
        .group_by(ranked.c.run_id)
    )
    return {r: (int(t), float(s)) for r, t, s in session.execute(stmt)}


def latest_drop_rates(session: Session, run_ids: Sequence[str]) -> dict[str, float]:
    """Per run: mean drop rate over the layers of rank 0's newest routing step (newest
    attempt first). Runs without routing rows (or only null rates) are absent."""
    if not run_ids:
        return {}
    newest = (RoutingRow.attempt.desc(), RoutingRow.step.desc())
    ranked = (
        select(
            RoutingRow.run_id,
            RoutingRow.drop_rate,
            func.dense_rank().over(partition_by=RoutingRow.run_id, order_by=newest).label("n"),
        )
        .where(RoutingRow.run_id.in_(run_ids), RoutingRow.rank == 0)
        .subquery()
    )
    stmt = (
        select(ranked.c.run_id, func.avg(ranked.c.drop_rate))
        .where(ranked.c.n == 1)
        .group_by(ranked.c.run_id)
    )
    return {r: float(v) for r, v in session.execute(stmt) if v is not None}


def goodput_row_counts(session: Session, run_ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per run: how many step, span, checkpoint and excluded-window rows it has (steps and
    spans counted from their rollups, not row by row). These rows are only ever inserted, so
    with the attempt rows (which are updated) they tell whether a run's goodput inputs
    changed."""
    counts: dict[str, list[int]] = {r: [0, 0, 0, 0] for r in run_ids}
    sums = (
        select(StepBlock.run_id, func.sum(StepBlock.n))
        .where(StepBlock.run_id.in_(run_ids), StepBlock.level == rollup_common.COARSE)
        .group_by(StepBlock.run_id),
        select(SpanTotal.run_id, func.sum(SpanTotal.n))
        .where(SpanTotal.run_id.in_(run_ids))
        .group_by(SpanTotal.run_id),
        select(CheckpointCommit.run_id, func.count())
        .where(CheckpointCommit.run_id.in_(run_ids))
        .group_by(CheckpointCommit.run_id),
        select(ExcludedWindow.run_id, func.count())
        .where(ExcludedWindow.run_id.in_(run_ids))
        .group_by(ExcludedWindow.run_id),
    )
    for i, stmt in enumerate(sums):
        for run_id, n in session.execute(stmt):
            counts[run_id][i] = int(n)
    return {r: tuple(c) for r, c in counts.items()}


# -- receipts, routing, export --


_OBSERVATION_COLUMNS = (
    Observation.attempt,
    Observation.rank,
    Observation.seam,
    Observation.requested,
    Observation.observed,
    Observation.reason,
    Observation.time,
    Observation.step,
)


def observations_of(session: Session, run_id: str) -> list[ObservationIn]:
    """Every backend observation of the run, oldest first."""
    stmt = (
        select(*_OBSERVATION_COLUMNS)
        .where(Observation.run_id == run_id)
        .order_by(Observation.time, Observation.attempt, Observation.rank, Observation.seam)
    )
    return [ObservationIn(*row) for row in session.execute(stmt)]


def peak_memory_of(session: Session, run_id: str) -> int | None:
    """The largest `mem_allocated_peak` of any step of the run (bytes), or None; from the
    coarse step blocks."""
    peak = session.scalar(
        select(func.max(StepBlock.mem_peak)).where(
            StepBlock.run_id == run_id, StepBlock.level == rollup_common.COARSE
        )
    )
    return int(peak) if peak is not None else None


class HistogramRow(NamedTuple):
    layer: int
    step: int
    attempt: int
    num_tokens: int
    top_k: int
    null_slot: bool
    capacity: int | None
    tokens_per_expert: list[int]
    dropped_per_expert: list[int]


def newest_histograms(
    session: Session, run_id: str, rank: int, newest_attempt: dict[int, int]
) -> dict[int, HistogramRow]:
    """Per layer, the histogram of its newest record (highest step of its newest attempt, as
    given): one indexed lookup per layer."""
    cols = [getattr(RoutingRow, name) for name in HistogramRow._fields]
    out = {}
    for layer, attempt in newest_attempt.items():
        row = session.execute(
            select(*cols)
            .where(
                RoutingRow.run_id == run_id,
                RoutingRow.attempt == attempt,
                RoutingRow.rank == rank,
                RoutingRow.layer == layer,
            )
            .order_by(RoutingRow.step.desc())
            .limit(1)
        ).first()
        if row is not None:
            out[layer] = HistogramRow(*row)
    return out


ExportWhat = Literal["steps", "spans", "routing", "observations"]


@dataclass(frozen=True)
class _ExportSpec:
    run_id: Any
    key: tuple[Any, ...]  # a unique, indexed order: the keyset pages follow it
    columns: tuple[Any, ...]


_EXPORTS: dict[str, _ExportSpec] = {
    "steps": _ExportSpec(
        Step.run_id,
        (Step.attempt, Step.rank, Step.step),
        (
            Step.attempt,
            Step.rank,
            Step.step,
            Step.start,
            Step.end,
            (Step.end - Step.start).label("step_time_s"),
            Step.tokens,
            Step.loss,
            Step.device_time_s,
            Step.hook_overhead_s,
            Step.flops,
            Step.mem_allocated_peak,
            Step.mem_reserved_peak,
            Step.alloc_retries,
        ),
    ),
    "spans": _ExportSpec(
        Span.run_id,
        (Span.attempt, Span.rank, Span.category, Span.start),
        (
            Span.attempt,
            Span.rank,
            Span.category,
            Span.start,
            Span.end,
            (Span.end - Span.start).label("duration_s"),
            Span.overlapped,
            Span.step,
        ),
    ),
    "routing": _ExportSpec(
        RoutingRow.run_id,
        (RoutingRow.attempt, RoutingRow.rank, RoutingRow.step, RoutingRow.layer),
        tuple(
            getattr(RoutingRow, name)
            for name in (
                "attempt",
                "rank",
                "step",
                "layer",
                "num_steps",
                "num_tokens",
                "top_k",
                "null_slot",
                "capacity",
                "shared_only_tokens",
                "aux_loss",
                "z_loss",
                "max_vio",
                "drop_rate",
                "null_fraction",
                "shared_only_fraction",
                "tokens_per_expert",
                "dropped_per_expert",
            )
        ),
    ),
    "observations": _ExportSpec(
        Observation.run_id,
        (Observation.attempt, Observation.rank, Observation.seam, Observation.observed),
        _OBSERVATION_COLUMNS,
    ),
}


def export_header(what: ExportWhat) -> list[str]:
    return [str(c.key) for c in _EXPORTS[what].columns]


@dataclass(frozen=True)
class ExportPage:
    rows: list[tuple[Any, ...]]
    after: tuple[Any, ...] | None  # the keyset position of the last row, for the next page


def export_page(
    session: Session,
    run_id: str,
    what: ExportWhat,
    after: tuple[Any, ...] | None,
    limit: int,
) -> ExportPage:
    """Up to `limit` rows after the keyset position `after` (None: from the start)."""
    spec = _EXPORTS[what]
    stmt = select(*spec.key, *spec.columns).where(spec.run_id == run_id)
    if after is not None:
        stmt = stmt.where(tuple_(*spec.key) > tuple_(*after))
    result = session.execute(stmt.order_by(*spec.key).limit(limit)).all()
    n = len(spec.key)
    rows = [tuple(r[n:]) for r in result]
    return ExportPage(rows, tuple(result[-1][:n]) if result else None)


def stored_for_import(session: Session, run_id: str) -> StoredRun | None:
    """What a run holds already, to check an ml-goodput import against (one query per
    table), or None when it is not stored. The run is locked before the first read, as
    ingest locks it, so what is read here still holds when the import is stored."""
    rollup_write.lock_runs(session, [run_id])
    run = session.execute(select(Run.name, Run.declared).where(Run.run_id == run_id)).first()
    if run is None:
        return None
    starts: dict[tuple[Any, ...], dict[str, Any]] = {}
    ends: dict[tuple[Any, ...], dict[str, Any]] = {}
    for a in session.execute(
        select(
            Attempt.attempt,
            Attempt.rank,
            Attempt.start,
            Attempt.start_declared,
            Attempt.end,
            Attempt.status,
            Attempt.cause,
        ).where(Attempt.run_id == run_id)
    ):
        if a.start_declared:  # else a placeholder start, from a record that came first
            starts[(a.attempt, a.rank)] = {"start": a.start}
        if a.end is not None:  # an open attempt may be ended by a longer log
            ends[(a.attempt, a.rank)] = {"end": a.end, "status": a.status, "cause": a.cause}
    steps = session.execute(
        select(Step.attempt, Step.rank, Step.step, Step.start, Step.end).where(
            Step.run_id == run_id
        )
    )
    spans = session.execute(
        select(Span.attempt, Span.rank, Span.category, Span.start, Span.end, Span.overlapped).where(
            Span.run_id == run_id
        )
    )
    commits = session.execute(
        select(
            CheckpointCommit.attempt,
            CheckpointCommit.rank,
            CheckpointCommit.step,
            CheckpointCommit.time,
            CheckpointCommit.ok,
        ).where(CheckpointCommit.run_id == run_id)
    )
    return StoredRun(
        run_id=run_id,
        name=run.name,
        declared=bool(run.declared),
        rows={
            "attempt_start": starts,
            "attempt_end": ends,
            "step": {(r.attempt, r.rank, r.step): {"start": r.start, "end": r.end} for r in steps},
            "span": {
                (r.attempt, r.rank, r.category, r.start): {
                    "end": r.end,
                    "overlapped": bool(r.overlapped),
                }
                for r in spans
            },
            "checkpoint": {
                (r.attempt, r.rank, r.step): {"time": r.time, "ok": bool(r.ok)} for r in commits
            },
        },
    )
