"""Application factory."""

from __future__ import annotations

import gc
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, SecretStr
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import AdmissionLimit
from service.api import DOCUMENTED_BODIES, RETRY_AFTER_S, health_router, router
from service.api_compare import router as compare_router
from service.api_import import router as import_router
from service.api_receipts import router as receipts_router
from service.dashboard_routes import router as dashboard_router
from service.db import make_sessionmaker
from service.metrics import IngestRefusals, ServiceMetrics
from service.metrics import router as metrics_router
from service.migrate import prepare_database
from service.schemas import ERROR_MODELS, error_response
from service.security import OPEN_PATHS, READ_METHODS, TOKEN_DOC, TokenAuth
from service.settings import Settings
from trainer_hooks.records import ContractJsonSchema


def _field(loc: Sequence[Any]) -> str:
    """The field a `loc` names, dotted, without its location; the location alone (`body`)
    when the error is about the whole of it."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or (str(loc[0]) if loc else "body")


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
        {"detail": [{"loc": ["body"], "field": "body", "msg": msg, "type": "constraint"}]},
        status_code=422,
    )


log = logging.getLogger("goodput.service")
_TRANSIENT = (
    "locked",
    "busy",
    "could not connect",
    "connection",
    "server closed",
    "timeout",
    "terminating",
    "too many clients",
    "the database system is",
    "deadlock detected",  # PostgreSQL chose this transaction to undo: sent again, it passes
    "could not serialize",
)


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}
    )


async def _db_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 for a database that is down or busy (clients retry); any other database error
    (SQLite reports bad SQL as an OperationalError too) is a bug: a logged 500, never
    dressed up as a 503."""
    text = str(getattr(exc, "orig", exc)).lower()
    lost = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if lost or any(word in text for word in _TRANSIENT):
        return _unavailable("database unavailable, retry later")
    log.error("database error", exc_info=exc)
    return JSONResponse({"detail": "internal database error"}, status_code=500)


async def _pool_timeout(_request: Request, _exc: Exception) -> JSONResponse:
    """Every pooled connection stayed busy for the pool's timeout: the database is
    overloaded for now, a 503 the client retries after Retry-After."""
    return _unavailable("database busy (no connection free in time), retry later")


class HeadAsGet:
    """Answer HEAD wherever GET is answered: the request runs as a GET and its body is
    dropped, its headers (Content-Length and Content-Type included) kept. FastAPI routes
    declare GET alone, which would make HEAD a 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before they are parsed. A gzip body
    (`Content-Encoding: gzip`) is decompressed as it streams in: at most `compressed_limit`
    bytes on the wire and `limit` once decompressed (a zip bomb stops at the limit)."""

    def __init__(self, app: ASGIApp, limit: int, compressed_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.compressed_limit = compressed_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        # Several Content-Encoding headers make one list, as HTTP says.
        coding = b",".join(v for k, v in scope.get("headers", []) if k == b"content-encoding")
        gzipped = _is_gzip(coding)
        if gzipped is None:
            await _respond(send, 415, _unsupported(coding), {"Accept-Encoding": "gzip"})
            return
        wire_limit = self.compressed_limit if gzipped else self.limit
        wire_msg = _too_large("compressed request body" if gzipped else "request body", wire_limit)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > wire_limit:
            await _respond(send, 413, wire_msg)
            return
        receive = _limited(receive, wire_limit, wire_msg)
        if gzipped:
            scope = _without(scope, (b"content-encoding", b"content-length"))
            receive = _gunzipping(receive, _Gunzip(self.limit))
        await self.app(scope, receive, send)


def _is_gzip(header: bytes) -> bool | None:
    """True for gzip, False for identity (or none), None for any other coding."""
    codings = [c.strip() for c in header.decode("latin-1").lower().split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return False
    return True if codings in (["gzip"], ["x-gzip"]) else None


def _unsupported(header: bytes) -> str:
    shown = header.decode("latin-1")[:40]
    return f"Content-Encoding {shown!r} is not supported: send gzip or identity"


def _too_large(what: str, limit: int) -> str:
    return f"{what} larger than the limit of {limit} bytes"


def _without(scope: Scope, names: tuple[bytes, ...]) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k not in names]
    return {**scope, "headers": headers}


def _limited(receive: Receive, limit: int, message: str) -> Receive:
    seen = 0

    async def limited() -> Message:
        # A body without Content-Length (chunked) is counted as it streams in; the
        # HTTPException passes through FastAPI's body parsing and becomes the 413.
        nonlocal seen
        msg = await receive()
        seen += len(msg.get("body", b""))
        if seen > limit:
            raise HTTPException(413, detail=message)
        return msg

    return limited


class _Gunzip:
    """Incremental gzip decoder (several members allowed) that stops past `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.produced = 0
        self.fed = 0
        self.zobj = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        self.fed += len(data)
        chunks = []
        while data:
            if self.zobj.eof:
                self.zobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            # At most one byte past the limit is ever produced.
            chunk = self._decompress(data, self.limit - self.produced + 1)
            self.produced += len(chunk)
            if self.produced > self.limit:
                detail = _too_large("request body", self.limit) + " once decompressed"
                raise HTTPException(413, detail=detail)
            chunks.append(chunk)
            data = self.zobj.unused_data if self.zobj.eof else self.zobj.unconsumed_tail
        return b"".join(chunks)

    def _decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self.zobj.decompress(data, max_length)
        except zlib.error as exc:
            raise HTTPException(400, detail=f"request body is not valid gzip: {exc}") from exc

    def finish(self) -> None:
        if self.fed and not self.zobj.eof:
            raise HTTPException(
                400, detail="request body is not valid gzip: the stream is cut short"
            )


def _gunzipping(receive: Receive, gunzip: _Gunzip) -> Receive:
    async def gunzipping() -> Message:
        msg = await receive()
        if msg["type"] != "http.request":
            return msg
        body = gunzip.feed(msg.get("body", b""))
        if not msg.get("more_body", False):
            gunzip.finish()
        return {**msg, "body": body}

    return gunzipping


async def _respond(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    resp = JSONResponse({"detail": detail}, status, headers=headers)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; prepares (and for SQLite, migrates) the database unless an engine is
    given."""
    settings = settings or Settings()
    if engine is None:
        engine = prepare_database(settings.database_url, settings.auto_migrate_sqlite, db=settings)
    app = FastAPI(
        title="goodput",
        version="0.1.0",
        description="Goodput, badput and receipts of Mixture-of-Experts training runs.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.metrics = ServiceMetrics(app.state.sessionmaker)
    app.include_router(health_router)
    app.include_router(router)
    app.include_router(receipts_router)
    app.include_router(compare_router)
    app.include_router(import_router)
    app.include_router(dashboard_router)
    app.include_router(metrics_router)
    _document(app, settings)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(OperationalError, _db_unavailable)
    app.add_exception_handler(DBAPIError, _db_unavailable)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout)
    _add_middleware(app, settings)
    return app


def from_env() -> FastAPI:
    """The app with its settings from the environment (GOODPUT_*): the factory each worker
    of `goodput serve --workers N` builds (`uvicorn service.app:from_env --factory`)."""
    application = create_app()
    # Long-lived objects go to the permanent generation, as `goodput serve` does (cli.py).
    gc.collect()
    gc.freeze()
    return application


def _document(app: FastAPI, settings: Settings) -> None:
    """Complete the OpenAPI document: the models of request bodies that routes read raw
    (`api.DOCUMENTED_BODIES`) and of error responses (`schemas.ERROR_MODELS`) in the
    components, where the routes' `$ref`s point; with tokens configured, how each route is
    authenticated (`security`) and its 401 and 403."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # which caches it in app.openapi_schema
        parts = schema.setdefault("components", {}).setdefault("schemas", {})
        models: tuple[type[BaseModel], ...] = (*DOCUMENTED_BODIES, *ERROR_MODELS)
        for model in models:
            doc = model.model_json_schema(
                ref_template="#/components/schemas/{model}", schema_generator=ContractJsonSchema
            )
            for name, part in {**doc.pop("$defs", {}), model.__name__: doc}.items():
                if parts.setdefault(name, part) != part:  # a name FastAPI already uses
                    raise RuntimeError(f"OpenAPI component {name!r} defined twice, differently")
        if settings.auth_enabled:
            _document_security(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_security(schema: dict[str, Any]) -> None:
    """The tokens of security.TokenAuth: every operation but the open paths takes one."""
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": TOKEN_DOC},
        "tokenHeader": {"type": "apiKey", "in": "header", "name": "X-Goodput-Token"},
    }
    for path, item in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for method, operation in item.items():
            operation["security"] = [{"bearer": []}, {"tokenHeader": []}]
            needs = "the write token" if method.upper() not in READ_METHODS else "a token"
            operation["responses"].update(
                {
                    "401": error_response(401, f"no token was sent: this route needs {needs}"),
                    "403": error_response(403),
                }
            )


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """From the outside in: HEAD as GET, CORS, tokens, admission, ingest refusals, body
    limit (Starlette runs the last added first): no body is read before the token is checked,
    a request past the server's capacity waits a bounded time (service/admission.py), and the
    refusal counter sees the body limit's 413s."""
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        compressed_limit=settings.max_compressed_body_bytes,
    )
    app.add_middleware(IngestRefusals, metrics=app.state.metrics.ingest)
    app.add_middleware(
        AdmissionLimit, limit=settings.max_concurrent_requests, wait_s=settings.admission_wait_s
    )
    if settings.auth_enabled:
        app.add_middleware(
            TokenAuth,
            write_token=_secret(settings.write_token),
            read_token=_secret(settings.read_token),
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding", "X-Goodput-Token"],
        )
    app.add_middleware(HeadAsGet)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
