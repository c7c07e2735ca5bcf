"""POST /api/v1/import/ml-goodput: history logged by Google's ml-goodput-measurement library,
mapped by `service.import_mgm` and stored through `repository.ingest` in one transaction."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from service import gc_pause
from service import repository as repo
from service.db import session_scope
from service.import_mgm import Mapped, MgmFormatError, map_log

router = APIRouter(prefix="/api/v1")

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "ml-goodput-measurement log entries: a JSON array or JSON lines",
        "content": {
            "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
            "application/x-ndjson": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


class ImportResult(BaseModel):
    inserted: int
    duplicates: int
    run_id: str
    ignored: int
    warnings: list[str]


RunName = Annotated[
    str | None,
    Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$", description="default: job name"),
]


@router.post("/import/ml-goodput", response_model=ImportResult, openapi_extra=_BODY_DOC)
async def import_ml_goodput(request: Request, run_name: RunName = None) -> ImportResult:
    """Import an ml-goodput-measurement log as one run (README: the mapping). Importing the
    same log again stores nothing twice; unreadable entries are a 422 naming them."""
    body = await request.body()
    factory = request.app.state.sessionmaker
    try:
        return await run_in_threadpool(_import, body, run_name, factory)
    except (MgmFormatError, repo.IngestError) as exc:
        raise RequestValidationError(exc.errors) from exc


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MgmFormatError([], f"the body is not UTF-8: {exc}") from exc


def _import(body: bytes, run_name: str | None, factory: sessionmaker[Session]) -> ImportResult:
    with gc_pause.paused():  # as for /ingest: a log holds many records until stored
        mapped: Mapped = map_log(_decode(body), run_name)
        with session_scope(factory) as session:
            stored = repo.ingest(session, mapped.records)
    return ImportResult(
        inserted=stored.inserted,
        duplicates=stored.duplicates,
        run_id=mapped.run_id,
        ignored=mapped.ignored,
        warnings=mapped.warnings,
    )
