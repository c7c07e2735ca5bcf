"""Application factory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import health_router, router
from service.dashboard_routes import router as dashboard_router
from service.db import make_sessionmaker
from service.migrate import prepare_database
from service.settings import Settings


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        item = {k: err[k] for k in ("loc", "msg", "type") if k in err}
        item["field"] = _field(err.get("loc", ()))
        errors.append(item)
    return JSONResponse({"detail": errors}, status_code=422)


async def _integrity_error(_request: Request, exc: Exception) -> JSONResponse:
    orig = getattr(exc, "orig", exc)
    msg = f"a record violates a database constraint: {str(orig).splitlines()[0]}"
    return JSONResponse(
        {"detail": [{"loc": ["body"], "field": "", "msg": msg, "type": "constraint"}]},
        status_code=422,
    )


async def _db_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "database unavailable, retry later"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before they are parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            # A body without Content-Length (chunked) is counted as it streams in; the
            # HTTPException passes through FastAPI's body parsing and becomes the 413.
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, detail=self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.limit} bytes"

    async def _refuse(self, send: Send) -> None:
        resp = JSONResponse({"detail": self._message()}, 413)
        await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; prepares (and for SQLite, migrates) the database unless an engine is
    given."""
    settings = settings or Settings()
    if engine is None:
        engine = prepare_database(
            settings.database_url, settings.auto_migrate_sqlite, settings.sqlite_busy_timeout_ms
        )
    app = FastAPI(
        title="goodput",
        version="0.1.0",
        description="Goodput, badput and receipts of Mixture-of-Experts training runs.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.include_router(health_router)
    app.include_router(router)
    app.include_router(dashboard_router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(OperationalError, _db_unavailable)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
