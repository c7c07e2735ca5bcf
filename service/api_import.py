"""POST /api/v1/import/ml-goodput: history logged by Google's ml-goodput-measurement library,
mapped by `service.import_mgm` and stored through `repository.ingest` in one transaction."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from service import gc_pause
from service import repository as repo
from service.db import session_scope
from service.import_mgm import (
    ImportConflict,
    ImportTooLarge,
    Mapped,
    MgmFormatError,
    check_stored,
    entry_errors,
    existing_run_warning,
    map_log,
)
from service.schemas import BODY_ERRORS, ImportConflictError, error_response, errors

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


class ImportResult(BaseModel):
    inserted: int
    duplicates: int
    run_id: str
    ignored: int
    warnings: list[str]
    existing_run: bool = Field(
        False,
        description="the run was already stored (this log, or a shorter one, imported "
        "before): the import extended or repeated it, as its first warning says",
    )


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
async def import_ml_goodput(
    request: Request, run_name: RunName = None
) -> ImportResult | JSONResponse:
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
    try:
        return await run_in_threadpool(_import, body, run_name, factory)
    except repo.IngestConflict as exc:  # a record contradicting a stored one of its key
        return _conflict(exc.conflicts)
    except ImportTooLarge as exc:
        raise HTTPException(413, detail=str(exc)) from exc
    except MgmFormatError as exc:
        raise RequestValidationError(exc.errors) from exc
    except _Refused as exc:  # records the store refused, named by their entries
        raise RequestValidationError(exc.errors) from exc
    except ImportConflict as exc:
        return _conflict(exc.detail)


def _conflict(detail: Any) -> JSONResponse:
    """A 409: permanent, as ingest's (sending the same log again cannot help)."""
    return JSONResponse({"detail": detail, "retriable": False}, status_code=409)


class _Refused(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        msg = f"line {line} is not UTF-8 (byte {exc.start} of the body): {exc.reason}"
        raise MgmFormatError(["line", line], msg) from exc


def _import(body: bytes, run_name: str | None, factory: sessionmaker[Session]) -> ImportResult:
    with gc_pause.paused():  # as for /ingest: a log holds many records until stored
        mapped: Mapped = map_log(_decode(body), run_name)
        with session_scope(factory) as session:
            existing = repo.stored_for_import(session, mapped.run_id)
            check_stored(mapped, existing)  # raises ImportConflict: nothing is stored
            try:
                stored = repo.ingest(session, mapped.records)
            except repo.IngestConflict:
                raise
            except repo.IngestError as exc:
                raise _Refused(entry_errors(mapped, exc.errors)) from exc
    warnings = mapped.warnings
    if existing is not None:
        note = existing_run_warning(mapped, existing, stored.inserted, stored.duplicates)
        warnings = [note, *warnings]
    return ImportResult(
        inserted=stored.inserted,
        duplicates=stored.duplicates,
        run_id=mapped.run_id,
        ignored=mapped.ignored,
        warnings=warnings,
        existing_run=existing is not None,
    )
