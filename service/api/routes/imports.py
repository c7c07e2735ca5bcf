"""POST /api/v1/import/ml-goodput: history logged by Google's ml-goodput-measurement library,
imported by services/imports.py."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from service.api.errors import BODY_ERRORS, error_response, errors
from service.schemas import ImportConflictError, ImportResult
from service.services.imports import import_log

router = APIRouter(prefix="/api/v1")

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "ml-goodput-measurement log entries: a JSON array or JSON lines",
        "content": {
            "application/json": {
                "schema": {"type": "array", "minItems": 1, "items": {"type": "object"}}
            },
            "application/x-ndjson": {"schema": {"type": "string", "minLength": 1}},
            "text/plain": {"schema": {"type": "string", "minLength": 1}},
        },
    }
}


RunName = Annotated[
    str | None,
    Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$", description="default: job name"),
]


_MEDIA_TYPES = frozenset(_BODY_DOC["requestBody"]["content"]) | {"application/jsonl"}

_ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    **errors(*BODY_ERRORS),
    409: error_response(
        409,
        "the log contradicts the run stored under its id (`conflicting_records`: the keys "
        "and both values) or names it otherwise (`run_name_mismatch`: both names and the "
        'run_name to pass); `"retriable": false`, nothing is stored',
        ImportConflictError,
    ),
    413: error_response(
        413, "the body is over the size limit, or the log has more entries than one import takes"
    ),
    415: error_response(
        415,
        "a Content-Type other than application/json, application/x-ndjson or text/plain "
        "(none at all is read as JSON), or an encoding other than gzip",
    ),
    422: error_response(
        422,
        "a log that cannot be imported, each error naming the entry (`index.N` of a JSON "
        "array, `line.N` of JSON lines) and its key, or the body (`body`: empty, no entries, "
        "no job_start_time); a record it maps to that the store refuses (a date more than a "
        "day after the server's clock) is named by the entry its time came from. Nothing is "
        "stored",
    ),
}


@router.post(
    "/import/ml-goodput",
    response_model=ImportResult,
    responses=_ERRORS_DOC,
    openapi_extra=_BODY_DOC,
)
async def import_ml_goodput(request: Request, run_name: RunName = None) -> ImportResult:
    """Import an ml-goodput-measurement log as one run (README: the mapping). Importing the
    same log again stores nothing twice; unreadable entries are a 422 naming them. A log
    that contradicts the run stored under its id, or another name for that run, is a 409
    naming the values, and nothing is stored."""
    kind = request.headers.get("content-type")
    if kind is not None:
        media = kind.split(";", 1)[0].strip().lower()
        if media not in _MEDIA_TYPES and not media.endswith("+json"):
            shown = kind[:80]
            detail = (
                f"Content-Type {shown!r}: send application/json (an array of entries) or "
                "application/x-ndjson (JSON lines)"
            )
            raise HTTPException(415, detail=detail)
    body = await request.body()
    factory = request.app.state.sessionmaker
    return await run_in_threadpool(import_log, body, run_name, factory)
