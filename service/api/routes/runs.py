"""Runs and their figures under /api/v1: list, one run, step and metric series, goodput."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic_core import to_json

from service.api.deps import RunIdPath, SessionDep
from service.api.errors import READ_ERRORS, RUN_ERRORS, errors
from service.schemas import GoodputRead, MetricSeries, RollingGoodput, RunList, RunRead, StepSeries
from service.services import runs
from trainer_hooks.records import MAX_COUNT, MAX_RANK

router = APIRouter(prefix="/api/v1")

EpochQuery = Annotated[float | None, Query(ge=946_684_800.0, le=7_258_118_400.0)]


@router.get("/runs", response_model=RunList, responses=errors(*READ_ERRORS))
def list_runs(
    session: SessionDep,
    name: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    project: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    status: Annotated[runs.RunStatus | None, Query()] = None,
    pattern: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    tag: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$")] = None,
    name_contains: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=r"^[^\x00]*$",
            description="a substring of the name, in any case (`name` is the exact name)",
        ),
    ] = None,
    lane: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=r"^[^\x00]*$",
            description="the dispatch the run asked for: `runtime_policy.dispatch_requested` "
            "(grouped, padded, loop, auto...)",
        ),
    ] = None,
    created_from: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=7_258_118_400.0,
            description="runs created at or after this time (seconds since the epoch)",
        ),
    ] = None,
    created_to: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=7_258_118_400.0,
            description="runs created before this time (seconds since the epoch); at or "
            "before `created_from`, no run matches",
        ),
    ] = None,
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
    """Runs, newest first, filtered by name (exact or `name_contains`), project, status,
    layer pattern, tag, dispatch lane and creation time; follow `next_cursor` for more."""
    return runs.list_runs(
        session,
        name=name,
        project=project,
        status=status,
        pattern=pattern,
        tag=tag,
        limit=limit,
        cursor=cursor,
        name_contains=name_contains,
        lane=lane,
        created_from=created_from,
        created_to=created_to,
    )


@router.get("/runs/{run_id}", response_model=RunRead, responses=errors(*RUN_ERRORS))
def get_run(run_id: RunIdPath, session: SessionDep) -> RunRead:
    """One run: identity, receipt parts, attempts and step count."""
    return runs.get_run(session, run_id)


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
    return runs.steps(session, run_id, rank, max_points, start_step, end_step)


@router.get("/runs/{run_id}/series", response_model=MetricSeries, responses=errors(*RUN_ERRORS))
def get_series(
    run_id: RunIdPath,
    session: SessionDep,
    metric: Annotated[
        Literal["step_time_s", "loss", "device_time_s"],
        Query(description="which scalar (device_time_s: the steps the hooks timed)"),
    ],
    rank: Annotated[int, Query(ge=0, le=MAX_RANK)] = 0,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    start_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
    end_step: Annotated[int | None, Query(ge=0, le=MAX_COUNT)] = None,
) -> Response:
    """One scalar of one rank's steps as columns (step, attempt, value), ordered by step then
    attempt; past `max_points`, downsampled like /steps, each bucket keeping the lowest and
    highest value of this scalar. A loss series holds the steps that have a loss, a
    device-time series the steps the hooks timed on the device (one in `device_every`)."""
    series = runs.metric_series(session, run_id, metric, rank, max_points, start_step, end_step)
    return Response(series.model_dump_json(), media_type="application/json")


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
    return runs.goodput(session, run_id, start, end, rank)


@router.get(
    "/runs/{run_id}/goodput/rolling", response_model=RollingGoodput, responses=errors(*RUN_ERRORS)
)
def get_rolling_goodput(
    run_id: RunIdPath,
    session: SessionDep,
    window_s: Annotated[float, Query(gt=0, le=1e8)],
    step_s: Annotated[float | None, Query(gt=0, le=1e8)] = None,
    rank: Annotated[int | None, Query(ge=0, le=MAX_RANK)] = None,
) -> Response:
    """Goodput over windows of `window_s` seconds every `step_s` (default: back to back);
    back-to-back windows add up to the whole run."""
    # Up to 10,000 windows: encoded from plain dicts, not validated again as models.
    body = runs.rolling_body(session, run_id, window_s, step_s, rank)
    return Response(to_json(body), media_type="application/json")
