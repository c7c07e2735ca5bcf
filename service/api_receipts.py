"""Receipt, routing and CSV export routes under /api/v1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic_core import to_json
from sqlalchemy.orm import Session, sessionmaker

from service import accounting
from service import repository as repo
from service import repository_rollups as rollups
from service.api import RunIdPath, SessionDep, run_or_404, run_status
from service.db import session_scope
from service.models import Attempt
from service.receipts import (
    AttemptEndIn,
    RankSteps,
    SeamReceipt,
    csv_lines,
    is_fallback,
    missing_parts,
    observed_seams,
    recompile_count,
    reference_rank,
    summarize_steps,
)
from service.schemas import (
    RUN_ERRORS,
    AttemptRead,
    ObservationRead,
    ObservedSeamRead,
    ReceiptGoodput,
    ReceiptRead,
    ReceiptSummary,
    ReceiptThroughput,
    RoutingHistogram,
    RoutingPoint,
    RoutingSeries,
    errors,
)
from service.step_stats import RECENT_STEPS
from trainer_hooks.records import MAX_RANK, MAX_SLOTS

router = APIRouter(prefix="/api/v1", tags=["receipts"])

EXPORT_PAGE_ROWS = 5000


# -- receipt --


def _seam_read(seam: SeamReceipt) -> ObservedSeamRead:
    return ObservedSeamRead(
        requested=seam.requested,
        observed=seam.observed,
        reason=seam.reason,
        fallback=seam.fallback,
        multiple=seam.multiple,
        observations=[
            ObservationRead(**o._asdict(), fallback=is_fallback(o.requested, o.observed, o.reason))
            for o in seam.observations
        ],
    )


def _ends(attempts: list[Attempt]) -> list[AttemptEndIn]:
    return [AttemptEndIn(a.attempt, a.rank, a.end, a.status, a.counters) for a in attempts]


def _summary(session: Session, run_id: str, recompiles: int) -> ReceiptSummary:
    """From the rollups: the same figures at any run length."""
    g = accounting.whole_run(session, run_id).goodput
    per_rank = {r: RankSteps(*sums) for r, sums in rollups.rank_step_sums(session, run_id).items()}
    ref = reference_rank(r for r, v in per_rank.items() if v.steps > 0)
    recent, final_loss = [], None
    if ref is not None:
        recent = rollups.newest_step_times(session, run_id, ref, RECENT_STEPS)
        newest = rollups.newest_attempt_steps(session, run_id, ref, 1)
        final_loss = newest[-1].loss if newest else None
    steps = summarize_steps(per_rank, recent, final_loss)
    return ReceiptSummary(
        goodput=ReceiptGoodput.model_validate(g, from_attributes=True),
        throughput=ReceiptThroughput(
            **steps._asdict(),
            peak_memory_bytes=repo.peak_memory_of(session, run_id),
            recompiles=recompiles,
        ),
    )


@router.get("/runs/{run_id}/receipt", response_model=ReceiptRead, responses=errors(*RUN_ERRORS))
def get_receipt(run_id: RunIdPath, session: SessionDep) -> ReceiptRead:
    """The run's receipt: plan, policy, environment, observed backends, summary, and what
    it lacks to be complete."""
    run = run_or_404(session, run_id)
    attempts = repo.attempts_of(session, [run_id])
    observations = repo.observations_of(session, run_id)
    seams = observed_seams(observations)
    summary = _summary(session, run_id, recompile_count(observations, _ends(attempts)))
    missing = missing_parts(
        run.model_plan,
        run.runtime_policy,
        run.environment,
        seams.keys(),
        repo.count_steps(session, run_id),
        _ends(attempts),
    )
    return ReceiptRead(
        run_id=run.run_id,
        name=run.name,
        project=run.project,
        created_at=run.created_at,
        status=run_status(attempts),
        complete=not missing,
        missing=missing,
        model_plan=run.model_plan,
        runtime_policy=run.runtime_policy,
        environment=run.environment,
        observed={name: _seam_read(s) for name, s in seams.items()},
        summary=summary,
        attempts=[AttemptRead.model_validate(a, from_attributes=True) for a in attempts],
    )


# -- routing --


_POINT_FIELDS = ("step", "attempt", *rollups.POINT_FIELDS)  # rollups.ROUTING_POINT less its layer
# get_routing writes points as plain dicts: their keys are RoutingPoint's fields, in order.
assert tuple(RoutingPoint.model_fields) == _POINT_FIELDS, "RoutingPoint and rollups disagree"


@router.get("/runs/{run_id}/routing", response_model=RoutingSeries, responses=errors(*RUN_ERRORS))
def get_routing(
    run_id: RunIdPath,
    session: SessionDep,
    layer: Annotated[int | None, Query(ge=0, le=MAX_SLOTS, description="one E layer")] = None,
    max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
    rank: Annotated[int, Query(ge=0, le=MAX_RANK)] = 0,
) -> Response:
    """Routing figures per E layer over steps, with each layer's newest histogram. Past
    `max_points` a layer is downsampled like the step series, keeping the lowest and highest
    max_vio of each bucket of step numbers; the layers share one step range and so one set of
    buckets."""
    run_or_404(session, run_id)
    series = rollups.routing_series(session, run_id, rank, layer, max_points)
    hists = repo.newest_histograms(
        session, run_id, rank, {n: s.newest_attempt for n, s in series.items()}
    )
    # RoutingSeries as plain dicts and lists, serialized in one Rust pass: thousands of points
    # for all layers, where a model per point cost more than reading them.
    layers = [
        {
            "layer": n,
            "total": s.total,
            "points": [dict(zip(_POINT_FIELDS, p[1:], strict=True)) for p in s.rows],
            "histogram": (
                RoutingHistogram(**hist._asdict()).model_dump()
                if (hist := hists.get(n)) is not None
                else None
            ),
        }
        for n, s in series.items()
    ]
    body = {"run_id": run_id, "rank": rank, "layers": layers}
    return Response(to_json(body), media_type="application/json")


# -- CSV export --


def csv_chunks(
    factory: sessionmaker[Session], run_id: str, what: repo.ExportWhat, page_rows: int
) -> Iterator[str]:
    """The header, then one chunk per keyset page of at most `page_rows` rows; each page is
    read in a short transaction of its own, so a slow reader holds nothing open."""
    yield csv_lines([repo.export_header(what)])
    after = None
    while True:
        with session_scope(factory) as session:
            page = repo.export_page(session, run_id, what, after, page_rows)
        if page.rows:
            yield csv_lines(page.rows)
        if len(page.rows) < page_rows:
            return
        after = page.after


_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "RFC 4180 CSV with a header row, streamed",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    },
    **errors(*RUN_ERRORS),
}


@router.get("/runs/{run_id}/export.csv", response_class=StreamingResponse, responses=_CSV_RESPONSE)
def export_csv(
    run_id: RunIdPath,
    request: Request,
    session: SessionDep,
    what: Annotated[repo.ExportWhat, Query(description="which records")] = "steps",
) -> StreamingResponse:
    """Every step, span, routing record or observation of the run as CSV, streamed."""
    run_or_404(session, run_id)
    chunks = csv_chunks(request.app.state.sessionmaker, run_id, what, EXPORT_PAGE_ROWS)
    return StreamingResponse(
        chunks,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{run_id}-{what}.csv"'},
    )
