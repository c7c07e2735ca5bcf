"""Runs and their figures: lists, one run, step and metric series, goodput of the whole run,
of a window and rolling; the service's health. What the routes and the pages both read."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.calc.goodput import AttemptIn, RankGoodput, RunGoodput, StepIn, attempt_statuses
from service.calc.goodput_window import rolling, run_extent
from service.calc.step_stats import step_figures
from service.calc.throughput import peak_of, step_rates
from service.schemas import (
    AttemptRead,
    DisruptionRead,
    GoodputRead,
    Health,
    MetricSeries,
    RankGoodputRead,
    RollingGoodput,
    RunList,
    RunRead,
    RunSummary,
    StepPoint,
    StepSeries,
    StragglerRead,
)
from service.services import accounting
from service.services.errors import Invalid, NotFound
from service.store import queries
from service.store.migrate import current_revision
from service.store.models import Attempt, Run
from service.store.queries import RunStatus
from service.store.rollups import read as rollup_read
from service.store.rollups import series as rollup_series
from service.store.rollups import windows


def run_status(attempts: list[Attempt], now: float | None = None) -> str:
    """running / completed / failed / stalled: the newest attempt's status, as the
    accounting decides it (docs/ACCOUNTING.md)."""
    if not attempts:
        return "running"
    rows = [
        AttemptIn(a.attempt, a.rank, a.start, a.end, a.status, a.last_seen, a.cause, a.heartbeat_s)
        for a in attempts
    ]
    statuses = attempt_statuses(rows, (), time.time() if now is None else now)
    return statuses[max(statuses)][0]


def statuses(session: Session, run_ids: Sequence[str]) -> dict[str, str]:
    """Each run's status (run_status), from one read of their attempts."""
    attempts: dict[str, list[Attempt]] = {r: [] for r in run_ids}
    for a in queries.attempts_of(session, list(run_ids)):
        attempts[a.run_id].append(a)
    return {r: run_status(a) for r, a in attempts.items()}


def _summary(run: Run, attempts: list[Attempt], tags: list[str]) -> RunSummary:
    return RunSummary(
        run_id=run.run_id,
        name=run.name,
        project=run.project,
        created_at=run.created_at,
        status=run_status(attempts),
        tags=tags,
        declared=run.declared,
        records_dropped=sum(a.dropped for a in attempts),
    )


def run_or_404(session: Session, run_id: str) -> Run:
    """The stored run, or NotFound naming it."""
    run = queries.get_run(session, run_id)
    if run is None:
        raise NotFound(f"run_id {run_id!r} not found")
    return run


def list_runs(
    session: Session,
    *,
    name: str | None = None,
    project: str | None = None,
    status: RunStatus | None = None,
    pattern: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    name_contains: str | None = None,
    lane: str | None = None,
    created_from: float | None = None,
    created_to: float | None = None,
) -> RunList:
    """Runs, newest first, filtered; `cursor` is the `next_cursor` of the page before.
    `name` is the exact name, `name_contains` a substring of it in any case; `lane` the
    requested dispatch (runtime_policy.dispatch_requested); created_from <= created_at <
    created_to (seconds since the epoch; an empty range matches no run)."""
    try:
        after = queries.Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise Invalid.field("query", "cursor", str(exc)) from exc
    runs, nxt = queries.list_runs(
        session,
        name=name,
        project=project,
        status=status,
        pattern=pattern,
        tag=tag,
        limit=limit,
        cursor=after,
        name_contains=name_contains,
        lane=lane,
        created_from=created_from,
        created_to=created_to,
    )
    ids = [r.run_id for r in runs]
    attempts: dict[str, list[Attempt]] = {}
    for a in queries.attempts_of(session, ids):
        attempts.setdefault(a.run_id, []).append(a)
    tags = queries.tags_of(session, ids)
    return RunList(
        runs=[_summary(r, attempts.get(r.run_id, []), tags.get(r.run_id, [])) for r in runs],
        next_cursor=nxt.encode() if nxt else None,
    )


def get_run(session: Session, run_id: str) -> RunRead:
    """One run: identity, receipt parts, attempts and step count."""
    run = run_or_404(session, run_id)
    attempts = queries.attempts_of(session, [run_id])
    return RunRead(
        **_summary(run, attempts, queries.tags_of(session, [run_id]).get(run_id, [])).model_dump(),
        model_plan=run.model_plan,
        runtime_policy=run.runtime_policy,
        environment=run.environment,
        attempts=[AttemptRead.model_validate(a, from_attributes=True) for a in attempts],
        num_steps=queries.count_steps(session, run_id),
    )


def steps(
    session: Session,
    run_id: str,
    rank: int = 0,
    max_points: int = 2000,
    start_step: int | None = None,
    end_step: int | None = None,
    metric: Literal["step_time_s", "device_time_s"] = "step_time_s",
) -> StepSeries:
    """One rank's steps by step then attempt, downsampled past `max_points` (each bucket of
    step numbers keeps its fastest and slowest step; by `device_time_s`: of the steps timed
    on the device, the lowest and highest device time)."""
    peak = peak_of(run_or_404(session, run_id).environment)
    total, rows = rollup_series.step_series(
        session, run_id, rank, start_step, end_step, max_points, metric=metric
    )
    points = []
    for row in rows:
        s = StepIn(*row)
        points.append(
            StepPoint(
                step=s.step,
                attempt=s.attempt,
                loss=s.loss,
                step_time_s=s.end - s.start,
                tokens=s.tokens,
                start=s.start,
                device_time_s=s.device_time_s,
                **step_rates(s, peak)._asdict(),
            )
        )
    return StepSeries(run_id=run_id, rank=rank, total=total, points=points)


def metric_series(
    session: Session,
    run_id: str,
    metric: Literal["step_time_s", "loss", "device_time_s"],
    rank: int = 0,
    max_points: int = 2000,
    start_step: int | None = None,
    end_step: int | None = None,
) -> MetricSeries:
    """One scalar of one rank's steps as columns, downsampled like `steps` by its value."""
    run_or_404(session, run_id)
    total, rows = rollup_series.metric_series(
        session, run_id, rank, metric, start_step, end_step, max_points
    )
    step_nos, attempts, values = zip(*rows, strict=True) if rows else ((), (), ())
    return MetricSeries.model_construct(  # typed by the columns; serialized once, in Rust
        run_id=run_id,
        rank=rank,
        metric=metric,
        total=total,
        step=list(step_nos),
        attempt=list(attempts),
        value=list(values),
    )


def _goodput_read(run_id: str, g: RunGoodput, rank: int | None) -> GoodputRead:
    chosen: RankGoodput | RunGoodput = g
    if rank is not None:
        found = [r for r in g.ranks if r.rank == rank]
        if not found:
            raise NotFound(f"rank {rank} has no records in run {run_id!r}")
        chosen = found[0]
    return GoodputRead(
        run_id=run_id,
        total_s=chosen.total_s,
        goodput_s=chosen.goodput_s,
        goodput_fraction=chosen.goodput_fraction,
        badput_s=chosen.badput_s,
        other_s=chosen.other_s,
        rank=rank if rank is not None else g.rank,
        steps=chosen.steps,
        tokens=chosen.tokens,
        ranks=[RankGoodputRead.model_validate(r, from_attributes=True) for r in g.ranks],
    )


def goodput(
    session: Session,
    run_id: str,
    start: float | None = None,
    end: float | None = None,
    rank: int | None = None,
) -> GoodputRead:
    """Goodput and badput of the run, of [start, end] or of one rank, with the ideal step
    time, stragglers and disruptions (docs/ACCOUNTING.md)."""
    run_or_404(session, run_id)
    acc = accounting.whole_run(session, run_id)
    if start is None and end is None:  # the whole run: from the rollups, fast at any length
        read = _goodput_read(run_id, acc.goodput, rank)
        ranks = [g.rank for g in acc.goodput.ranks]
        recent = rollup_read.recent_step_times(session, run_id, ranks, read.rank)
    else:  # a window: the whole run's decisions, the records cut to it and summed by the DB
        lo, hi = start or 0.0, end or float("inf")
        reader = windows.WindowReader(session, run_id, acc.decided)
        try:
            g, parts = accounting.window(reader, acc, lo, hi)
        except ValueError as exc:
            raise Invalid.field("query", "end", str(exc)) from exc
        read = _goodput_read(run_id, g, rank)
        recent = reader.recent_step_times(lo, hi, parts, read.rank)
    fig = step_figures(recent, read.rank, acc.disruptions(read.rank))
    return read.model_copy(
        update={
            "ideal_step_time_s": fig.ideal_step_time_s,
            "step_time_deviation_s": fig.step_time_deviation_s,
            "stragglers": [
                StragglerRead.model_validate(s, from_attributes=True) for s in fig.stragglers
            ],
            "disruptions": [
                DisruptionRead.model_validate(d, from_attributes=True) for d in fig.disruptions
            ],
        }
    )


def rolling_body(
    session: Session,
    run_id: str,
    window_s: float,
    step_s: float | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """Goodput over windows of `window_s` seconds every `step_s` (default: back to back), as
    plain dicts and lists in the fields of RollingGoodput: near the cap of 10,000 windows a
    pydantic model a window cost more than their accounting."""
    run_or_404(session, run_id)
    acc = accounting.whole_run(session, run_id)
    try:
        bounds = rolling(run_extent(acc.goodput), window_s, step_s or window_s)
    except ValueError as exc:
        raise Invalid.field("query", "window_s", str(exc)) from exc
    except OverflowError as exc:  # (run length - window_s) / step_s past the largest float
        msg = f"window_s={window_s}, step_s={step_s or window_s} give too many windows"
        raise Invalid.field("query", "step_s" if step_s else "window_s", msg) from exc
    if rank is not None and not any(r.rank == rank for r in acc.goodput.ranks):
        raise NotFound(f"rank {rank} has no records in run {run_id!r}")
    reader = windows.WindowReader(session, run_id, acc.decided)  # what every window shares
    figures = accounting.rolling(reader, acc, bounds)
    return {
        "run_id": run_id,
        "window_s": window_s,
        "step_s": step_s or window_s,
        "windows": figures.rows(rank),
    }


def rolling_goodput(
    session: Session,
    run_id: str,
    window_s: float,
    step_s: float | None = None,
    rank: int | None = None,
) -> RollingGoodput:
    """`rolling_body` as a RollingGoodput."""
    return RollingGoodput.model_validate(rolling_body(session, run_id, window_s, step_s, rank))


def health(engine: Engine) -> Health:
    """The database reached and its schema revision; raises what reaching it raised."""
    queries.ping(engine)
    return Health(status="ok", database="ok", revision=current_revision(engine))
