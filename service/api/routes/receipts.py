"""Receipt, routing and CSV export routes under /api/v1."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic_core import to_json

from service.api.deps import RunIdPath, SessionDep
from service.api.errors import RUN_ERRORS, errors
from service.schemas import ReceiptRead, RoutingSeries
from service.services import receipts
from service.services.runs import run_or_404
from trainer_hooks.records import MAX_RANK, MAX_SLOTS

router = APIRouter(prefix="/api/v1", tags=["receipts"])

EXPORT_PAGE_ROWS = 5000


@router.get("/runs/{run_id}/receipt", response_model=ReceiptRead, responses=errors(*RUN_ERRORS))
def get_receipt(run_id: RunIdPath, session: SessionDep) -> ReceiptRead:
    """The run's receipt: plan, policy, environment, observed backends, summary, and what
    it lacks to be complete."""
    return receipts.receipt(session, run_id)


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
    body = receipts.routing(session, run_id, layer, max_points, rank)
    return Response(to_json(body), media_type="application/json")


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
    what: Annotated[receipts.ExportWhat, Query(description="which records")] = "steps",
) -> StreamingResponse:
    """Every step, span, routing record or observation of the run as CSV, streamed."""
    run_or_404(session, run_id)
    chunks = receipts.csv_chunks(request.app.state.sessionmaker, run_id, what, EXPORT_PAGE_ROWS)
    return StreamingResponse(
        chunks,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{run_id}-{what}.csv"'},
    )
