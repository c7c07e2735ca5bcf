"""Import of an ml-goodput-measurement log: mapped by `importers.mgm`, checked against the
run stored under its id, stored through the ingest in one transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.importers.mgm import (
    ImportConflict,
    ImportTooLarge,
    Mapped,
    MgmFormatError,
    check_stored,
    entry_errors,
    existing_run_warning,
    map_log,
)
from service.schemas import ImportResult
from service.services import gc_pause
from service.services.errors import Conflict, Invalid, TooLarge
from service.store import ingest as store
from service.store import queries
from service.store.db import session_scope


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        msg = f"line {line} is not UTF-8 (byte {exc.start} of the body): {exc.reason}"
        raise MgmFormatError(["line", line], msg) from exc


def import_log(body: bytes, run_name: str | None, factory: sessionmaker[Session]) -> ImportResult:
    """Import the log in `body` as one run (named `run_name`, by default its job name).
    Raises Invalid naming unreadable entries (or records the store refuses, by the entry
    they came from), TooLarge past the entry limit, Conflict for a log that contradicts or
    renames the run stored under its id; then nothing is stored."""
    try:
        return _import(body, run_name, factory)
    except store.IngestConflict as exc:  # a record contradicting a stored one of its key
        raise Conflict(exc.conflicts) from exc
    except ImportTooLarge as exc:
        raise TooLarge(str(exc)) from exc
    except MgmFormatError as exc:
        raise Invalid(exc.errors) from exc
    except ImportConflict as exc:
        raise Conflict(exc.detail) from exc


def _import(body: bytes, run_name: str | None, factory: sessionmaker[Session]) -> ImportResult:
    with gc_pause.paused():  # as for /ingest: a log holds many records until stored
        mapped: Mapped = map_log(_decode(body), run_name)
        with session_scope(factory) as session:
            existing = queries.stored_for_import(session, mapped.run_id)
            check_stored(mapped, existing)  # raises ImportConflict: nothing is stored
            try:
                stored = store.ingest(session, mapped.records)
            except store.IngestConflict:
                raise
            except store.IngestError as exc:  # records the store refused, named by entry
                raise Invalid(entry_errors(mapped, exc.errors)) from exc
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
