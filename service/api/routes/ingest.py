"""POST /api/v1/ingest: a batch of the hooks' records, stored before the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from service.api.deps import SessionmakerDep, json_body
from service.api.errors import BODY_ERRORS, error_response, errors
from service.schemas import IngestConflictError
from service.services import ingest as ingest_service
from trainer_hooks.records import IngestBatch, IngestResult

router = APIRouter(prefix="/api/v1")

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
) -> Response:
    """Store a batch of records (`IngestBatch`) in one transaction, committed before the
    answer: a 200 means stored (a commit that fails is an error response). Records may come
    in any order; resent records count as duplicates, a record resent with other content
    is a 409 naming it (nothing of the batch stored)."""
    result = ingest_service.ingest(factory, body)
    # committed: the service has returned. Refusals are counted by status (IngestRefusals).
    request.app.state.metrics.ingest.accepted(result.inserted, result.duplicates)
    # The answer as JSON here: a model returned from a sync route is validated again against
    # response_model (which stays, for the documents) in a second trip to the thread pool.
    return Response(result.model_dump_json(), media_type="application/json")
