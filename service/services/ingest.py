"""Ingest: a batch validated by the wire contract, then stored in one unit of work that is
committed before the caller answers (a 200 means stored)."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from service.services import gc_pause
from service.services.errors import Conflict, Invalid
from service.store import ingest as store
from service.store.db import session_scope
from trainer_hooks.records import IngestBatch, IngestResult


def parse_batch(body: bytes) -> IngestBatch:
    """The batch in `body` (parsed by pydantic-core in one pass), or Invalid naming each
    invalid field under `body`."""
    try:
        return IngestBatch.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise Invalid([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc


def store_body(session: Session, body: bytes) -> IngestResult:
    """Validate and store one batch in `session`. The caller pauses the collector around this
    call: the batch's records are freed when it returns, before the collector runs again, so
    that no collection passes over them (gc_pause)."""
    batch = parse_batch(body)
    try:
        return store.ingest(session, batch.records)
    except store.IngestConflict as exc:
        raise Conflict(exc.conflicts) from exc
    except store.IngestError as exc:
        raise Invalid(exc.errors) from exc


def ingest(factory: sessionmaker[Session], body: bytes) -> IngestResult:
    """Store a batch in a transaction of its own, committed when this returns; a conflict
    (Conflict) or an invalid record (Invalid) stores nothing of it."""
    with gc_pause.paused(), session_scope(factory) as session:
        return store_body(session, body)
