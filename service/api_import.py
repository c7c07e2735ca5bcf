"""POST /api/v1/import/ml-goodput: history logged by Google's ml-goodput-measurement library,
mapped by `service.import_mgm` and stored through `repository.ingest` in one transaction."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import gc_pause
from service import repository as repo
from service import repository_rollups as rollups
from service.db import session_scope
from service.import_mgm import (
    ImportConflict,
    ImportTooLarge,
    Mapped,
    MgmFormatError,
    StoredRun,
    check_stored,
    existing_run_warning,
    map_log,
)
from service.models import Attempt, CheckpointCommit, Run, Span, Step

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
    413: {"description": "the body is over the size limit, which the message states"},
    415: {
        "description": "a Content-Type other than application/json, application/x-ndjson "
        "or text/plain (none at all is read as JSON), or an encoding other than gzip"
    },
    409: {
        "description": "the log contradicts the run stored under its id (`conflicting_records`: "
        "the keys and both values) or names it otherwise (`run_name_mismatch`: both names and "
        "the run_name to pass); nothing is stored"
    },
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
    try:
        return await run_in_threadpool(_import, body, run_name, factory)
    except repo.IngestConflict as exc:  # a record contradicting a stored one of its key
        raise HTTPException(409, detail=exc.conflicts) from exc
    except ImportTooLarge as exc:
        raise HTTPException(413, detail=str(exc)) from exc
    except (MgmFormatError, repo.IngestError) as exc:
        raise RequestValidationError(exc.errors) from exc
    except ImportConflict as exc:
        raise HTTPException(409, detail=exc.detail) from exc


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MgmFormatError([], f"the body is not UTF-8: {exc}") from exc


def _import(body: bytes, run_name: str | None, factory: sessionmaker[Session]) -> ImportResult:
    with gc_pause.paused():  # as for /ingest: a log holds many records until stored
        mapped: Mapped = map_log(_decode(body), run_name)
        with session_scope(factory) as session:
            existing = _stored_run(session, mapped.run_id)
            check_stored(mapped, existing)  # raises ImportConflict: nothing is stored
            stored = repo.ingest(session, mapped.records)
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


def _stored_run(session: Session, run_id: str) -> StoredRun | None:
    """What the run holds already, to check the import against (one query per table), or
    None when it is not stored. The run is locked before the first read, as ingest locks
    it, so what is read here still holds when the import is stored."""
    rollups.lock_runs(session, [run_id])
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
