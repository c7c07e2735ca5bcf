"""REST routes under /api/v1, plus /healthz."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from service import accounting, gc_pause
from service import repository as repo
from service import repository_rollups as rollups
from service import repository_windows as windows
from service.db import session_scope
from service.goodput import AttemptIn, RankGoodput, RunGoodput, StepIn, attempt_statuses
from service.goodput_window import rolling, run_extent
from service.migrate import current_revision
from service.models import Attempt, Run
from service.schemas import (
    BODY_ERRORS,
    READ_ERRORS,
    RUN_ERRORS,
    AttemptRead,
    DisruptionRead,
    GoodputRead,
    GoodputWindow,
    Health,
    IngestConflictError,
    MetricSeries,
    RankGoodputRead,
    RollingGoodput,
    RunList,
    RunRead,
    RunSummary,
    StepPoint,
    StepSeries,
    StragglerRead,
    error_response,
    errors,
)
from service.step_stats import step_figures
from service.throughput import peak_of, step_rates
from trainer_hooks.records import ID_PATTERN, MAX_COUNT, MAX_RANK, IngestBatch, IngestResult


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work (session_scope). Routes take it as `SessionDep`, whose
    scope "function" closes it when the route returns, before the response is sent: a
    commit that fails is the error response, and the database holds what a 200 said."""
    with session_scope(request.app.state.sessionmaker) as session:
        yield session


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    """For routes that open their unit of work themselves (`session_scope`) and commit it
    before they answer, as ingest does."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionmakerDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]
RunIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="the run's id")]
RunIdQuery = Annotated[str, Query(pattern=ID_PATTERN, description="the run's id")]

router = APIRouter(prefix="/api/v1")
health_router = APIRouter()
RETRY_AFTER_S = 1  # the Retry-After of every 503


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
    run = repo.get_run(session, run_id)
    if run is None:
        raise HTTPException(404, detail=f"run_id {run_id!r} not found")
    return run


async def json_body(request: Request) -> bytes:
    """The raw body of a JSON request (parsed by pydantic-core in one pass, not through
    Python objects first); any other declared media type is a 415."""
    kind = request.headers.get("content-type")
    if kind is not None:
        media = kind.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise HTTPException(415, detail=f"Content-Type {kind!r}: send application/json")
    return await request.body()


def parse_batch(body: bytes) -> IngestBatch:
    """The batch in `body`, or the 422 naming each invalid field (as FastAPI words it)."""
    try:
        return IngestBatch.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc


# The body is read by `json_body`, so FastAPI documents no model for it: say it here.
INGEST_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/IngestBatch"}}},
    }
}
DOCUMENTED_BODIES = (IngestBatch,)
_INGEST_ERRORS: dict[int | str, dict[str, Any]] = {
    **errors(*BODY_ERRORS),
    409: error_response(
        409,
        "a record resent under a stored natural key with other content: `detail[]` names "
        'each (`record`, `key`, `fields`: stored and sent values), `"retriable": false`; '
        "nothing of the batch is stored",
        IngestConflictError,
    ),
    422: error_response(
        422,
        "invalid records, each error naming its field (`records.3.step.end`): the schema's "
        "rules, and those it cannot state: an integer written as one (`5`, not `5.0`), an "
        "end before its start, a date more than a day after the server's clock, timings "
        "that contradict stored records (overlapping steps of a rank, a record after its "
        "attempt's end); nothing of the batch is stored",
    ),
}


@router.post(
    "/ingest",
    response_model=IngestResult,
    openapi_extra=INGEST_BODY_DOC,
    responses=_INGEST_ERRORS,
)
def ingest(
    request: Request, body: Annotated[bytes, Depends(json_body)], factory: SessionmakerDep
) -> IngestResult | JSONResponse:
    """Store a batch of records (`IngestBatch`) in one transaction, committed before the
    answer: a 200 means stored (a commit that fails is an error response). Records may come
    in any order; resent records count as duplicates, a record resent with other content
    is a 409 naming it (nothing of the batch stored)."""
    try:
        with gc_pause.paused(), session_scope(factory) as session:
            result = store_body(session, body)
    except repo.IngestConflict as exc:  # rolled back by session_scope
        return JSONResponse({"detail": exc.conflicts, "retriable": False}, status_code=409)
    # committed: session_scope has returned. Refusals are counted by status (IngestRefusals).
    request.app.state.metrics.ingest.accepted(result.inserted, result.duplicates)
    return result


def store_body(session: Session, body: bytes) -> IngestResult:
    """Validate and store one batch. The caller pauses the collector around this call: the
    batch's records are freed when it returns, before the collector runs again, so that no
    collection passes over them (gc_pause)."""
    batch = parse_batch(body)
    try:
        return repo.ingest(session, batch.records)
    except repo.IngestConflict:
        raise
    except repo.IngestError as exc:
        raise RequestValidationError(exc.errors) from exc


@router.get("/runs", response_model=RunList, responses=errors(*READ_ERRORS))
def list_runs(
    session: SessionDep,
    name: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    project: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    status: Annotated[Literal["running", "completed", "failed", "stalled"] | None, Query()] = None,
    pattern: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    tag: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=1000,
            pattern=r"^[A-Za-z0-9_-]*$",
            description="`next_cursor` of the previous page (another is a 422)",
        ),
    ] = None,
) -> RunList:
    """Runs, newest first, filtered by name, project, status, layer pattern and tag; follow
    `next_cursor` for more."""
    try:
        after = repo.Cursor.decode(cursor) if cursor else None
    except ValueError as exc:
        raise RequestValidationError(
            [{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}]
        ) from exc
    runs, nxt = repo.list_runs(
        session,
        name=name,
        project=project,
        status=status,
        pattern=pattern,
        tag=tag,
        limit=limit,
        cursor=after,
    )
    ids = [r.run_id for r in runs]
    attempts: dict[str, list[Attempt]] = {}
    for a in repo.attempts_of(session, ids):
        attempts.setdefault(a.run_id, []).append(a)
    tags = repo.tags_of(session, ids)
    return RunList(
        runs=[_summary(r, attempts.get(r.run_id, []), tags.get(r.run_id, [])) for r in runs],
        next_cursor=nxt.encode() if nxt else None,
    )


@router.get("/runs/{run_id}", response_model=RunRead, responses=errors(*RUN_ERRORS))
def get_run(run_id: RunIdPath, session: SessionDep) -> RunRead:
    """One run: identity, receipt parts, attempts and step count."""
    run = run_or_404(session, run_id)
    attempts = repo.attempts_of(session, [run_id])
    return RunRead(
        **_summary(run, attempts, repo.tags_of(session, [run_id]).get(run_id, [])).model_dump(),
        model_plan=run.model_plan,
        runtime_policy=run.runtime_policy,
        environment=run.environment,
        attempts=[AttemptRead.model_validate(a, from_attributes=True) for a in attempts],
        num_steps=repo.count_steps(session, run_id),
    )


@router.get("/runs/{run_id}/steps", response_model=StepSeries, responses=errors(*RUN_ERRORS))
def get_steps(
    run_id: RunIdPath,
    session: SessionDep,
    rank: Annotated[int, Query(ge=0, le=MAX_RANK)] = 0,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    start_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
    end_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
) -> StepSeries:
    """Step series of one rank, by step then attempt. Past `max_points` it is downsampled: the
    steps are cut into at most max_points / 2 buckets of step numbers, and each bucket keeps
    its fastest and its slowest step, so spikes survive."""
    peak = peak_of(run_or_404(session, run_id).environment)
    total, rows = rollups.step_series(session, run_id, rank, start_step, end_step, max_points)
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


@router.get("/runs/{run_id}/series", response_model=MetricSeries, responses=errors(*RUN_ERRORS))
def get_series(
    run_id: RunIdPath,
    session: SessionDep,
    metric: Annotated[Literal["step_time_s", "loss"], Query(description="which scalar")],
    rank: Annotated[int, Query(ge=0, le=MAX_RANK)] = 0,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    start_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
    end_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
) -> Response:
    """One scalar of one rank's steps as columns (step, attempt, value), ordered by step then
    attempt; past `max_points`, downsampled like /steps, each bucket keeping the lowest and
    highest value of this scalar. A loss series holds the steps that have a loss."""
    run_or_404(session, run_id)
    total, rows = rollups.metric_series(
        session, run_id, rank, metric, start_step, end_step, max_points
    )
    steps, attempts, values = zip(*rows, strict=True) if rows else ((), (), ())
    series = MetricSeries.model_construct(  # typed by the columns; serialized once, in Rust
        run_id=run_id,
        rank=rank,
        metric=metric,
        total=total,
        step=list(steps),
        attempt=list(attempts),
        value=list(values),
    )
    return Response(series.model_dump_json(), media_type="application/json")


EpochQuery = Annotated[float | None, Query(ge=946_684_800.0, le=7_258_118_400.0)]


def _rank_read(r: RankGoodput) -> RankGoodputRead:
    return RankGoodputRead.model_validate(r, from_attributes=True)


def _goodput_read(run_id: str, g: RunGoodput, rank: int | None) -> GoodputRead:
    chosen: RankGoodput | RunGoodput = g
    if rank is not None:
        found = [r for r in g.ranks if r.rank == rank]
        if not found:
            raise HTTPException(404, detail=f"rank {rank} has no records in run {run_id!r}")
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
        ranks=[_rank_read(r) for r in g.ranks],
    )


def _field_error(field: str, exc: ValueError) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ["query", field], "msg": str(exc), "type": "value_error"}]
    )


@router.get("/runs/{run_id}/goodput", response_model=GoodputRead, responses=errors(*RUN_ERRORS))
def get_goodput(
    run_id: RunIdPath,
    session: SessionDep,
    start: EpochQuery = None,
    end: EpochQuery = None,
    rank: Annotated[int | None, Query(ge=0, le=MAX_RANK)] = None,
) -> GoodputRead:
    """Goodput and badput of the run (or of [start, end], or of one rank); the parts add up
    to total_s. Without `rank`, the figures are the slowest rank's (chosen on the whole run,
    also for a window). The rules: docs/ACCOUNTING.md."""
    run_or_404(session, run_id)
    acc = accounting.whole_run(session, run_id)
    if start is None and end is None:  # the whole run: from the rollups, fast at any length
        read = _goodput_read(run_id, acc.goodput, rank)
        ranks = [g.rank for g in acc.goodput.ranks]
        recent = rollups.recent_step_times(session, run_id, ranks, read.rank)
    else:  # a window: the whole run's decisions, the records cut to it and summed by the DB
        lo, hi = start or 0.0, end or float("inf")
        reader = windows.WindowReader(session, run_id, acc)
        try:
            g, parts = accounting.window(reader, acc, lo, hi)
        except ValueError as exc:
            raise _field_error("end", exc) from exc
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


@router.get(
    "/runs/{run_id}/goodput/rolling", response_model=RollingGoodput, responses=errors(*RUN_ERRORS)
)
def get_rolling_goodput(
    run_id: RunIdPath,
    session: SessionDep,
    window_s: Annotated[float, Query(gt=0, le=1e8)],
    step_s: Annotated[float | None, Query(gt=0, le=1e8)] = None,
    rank: Annotated[int | None, Query(ge=0, le=MAX_RANK)] = None,
) -> RollingGoodput:
    """Goodput over windows of `window_s` seconds every `step_s` (default: back to back);
    back-to-back windows add up to the whole run."""
    run_or_404(session, run_id)
    acc = accounting.whole_run(session, run_id)
    try:
        bounds = rolling(run_extent(acc.goodput), window_s, step_s or window_s)
    except ValueError as exc:
        raise _field_error("window_s", exc) from exc
    except OverflowError as exc:  # (run length - window_s) / step_s past the largest float
        msg = f"window_s={window_s}, step_s={step_s or window_s} give too many windows"
        raise _field_error("step_s" if step_s else "window_s", ValueError(msg)) from exc
    if rank is not None and not any(r.rank == rank for r in acc.goodput.ranks):
        raise HTTPException(404, detail=f"rank {rank} has no records in run {run_id!r}")
    out = []
    reader = windows.WindowReader(session, run_id, acc)  # reads what every window shares once
    for (a, b), g in zip(bounds, accounting.rolling(reader, acc, bounds), strict=True):
        read = _goodput_read(run_id, g, rank)
        out.append(GoodputWindow(start=a, end=b, **read.model_dump(exclude={"run_id", "ranks"})))
    return RollingGoodput(run_id=run_id, window_s=window_s, step_s=step_s or window_s, windows=out)


@health_router.get(
    "/healthz",
    response_model=Health,
    responses={503: error_response(503, "the database is unreachable: retry later")},
)
def healthz(request: Request) -> Any:
    """Liveness and database reachability; never needs a token."""
    engine = request.app.state.engine
    try:
        repo.ping(engine)
        return Health(status="ok", database="ok", revision=current_revision(engine))
    except Exception as exc:
        raise HTTPException(
            503,
            detail=f"database unreachable: {type(exc).__name__}",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
