"""Error answers: how each error status is documented (`error_response`, `errors`) and the
handlers that word what the services refuse (services/errors.py) and what the database
raises (503 when it is busy or down, a logged 500 for anything else)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from dashboards.pages import error_page
from service.api.negotiation import wants_html
from service.schemas import (
    CompareRefusal,
    ErrorMessage,
    FieldErrors,
    ImportConflictError,
    IngestConflictError,
)
from service.services.errors import Conflict, Invalid, NotFound, Refused, TooLarge

RETRY_AFTER_S = 1  # the Retry-After of every 503

ERROR_MODELS: tuple[type[BaseModel], ...] = (
    ErrorMessage,
    FieldErrors,
    IngestConflictError,
    ImportConflictError,
    CompareRefusal,
)

_DESCRIPTIONS: dict[int, str] = {
    400: "the body is declared gzip (`Content-Encoding`) but is not valid gzip",
    401: "a token is needed (`Authorization: Bearer <token>` or `X-Goodput-Token`)",
    403: "the token was not accepted, or this route needs the write token",
    404: "the run named (or the rank of the run) is not stored",
    413: "the body is over the size limit (before or after gzip), which the message states",
    415: "a Content-Type or Content-Encoding this route does not read",
    422: "invalid parameters or body, each error naming its field (`field`); nothing of a "
    "refused body is stored",
    503: "the database is busy or unreachable: retry after `Retry-After` seconds",
}
_MODELS: dict[int, type[BaseModel]] = {422: FieldErrors}
RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


def error_response(
    status: int, description: str | None = None, model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """One documented error response: JSON of `model` (by default ErrorMessage, FieldErrors
    for 422) under `#/components/schemas`, where app.py puts ERROR_MODELS."""
    chosen = model or _MODELS.get(status, ErrorMessage)
    ref = {"$ref": f"#/components/schemas/{chosen.__name__}"}
    doc: dict[str, Any] = {
        "description": description or _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ref}},
    }
    if status == 503:
        doc["headers"] = RETRY_AFTER_HEADER
    return doc


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: each status with its usual description and model."""
    return {s: error_response(s) for s in statuses}


# Every route reading the database may answer 503 (busy, locked, unreachable), and every
# route with parameters 422; a route reading one run 404 too.
READ_ERRORS = (422, 503)
RUN_ERRORS = (404, 422, 503)
# Routes that read a body: 400 (bad gzip), 413 and 415 from middleware.BodyLimit and the route.
BODY_ERRORS = (400, 413, 415, 422, 503)


def _field(loc: Sequence[Any]) -> str:
    """The field a `loc` names, dotted, without its location; the location alone (`body`)
    when the error is about the whole of it."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or (str(loc[0]) if loc else "body")


def _field_errors(errors: Sequence[Any]) -> JSONResponse:
    items = []
    for err in errors:
        item = {k: err[k] for k in ("loc", "msg", "type") if k in err}
        item["field"] = _field(err.get("loc", ()))
        items.append(item)
    return JSONResponse({"detail": items}, status_code=422)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _field_errors(exc.errors())


async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Invalid)
    return _field_errors(exc.errors)


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    """A 409 that sending again cannot help: the records contradict stored ones."""
    assert isinstance(exc, Conflict)
    return JSONResponse({"detail": exc.detail, "retriable": False}, status_code=409)


async def _refused(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    return JSONResponse({"detail": exc.detail}, status_code=409)


async def _too_large(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=413)


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


def unavailable(detail: str) -> JSONResponse:
    """A 503 the client retries after Retry-After."""
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
        return unavailable("database unavailable, retry later")
    log.error("database error", exc_info=exc)
    return JSONResponse({"detail": "internal database error"}, status_code=500)


async def _pool_timeout(_request: Request, _exc: Exception) -> JSONResponse:
    """Every pooled connection stayed busy for the pool's timeout: the database is
    overloaded for now, a 503 the client retries after Retry-After."""
    return unavailable("database busy (no connection free in time), retry later")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:  # Allow: every method of the path, not of one route of it
        allowed = _methods_of(request)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


def _methods_of(request: Request) -> list[str]:
    """The methods the OpenAPI document gives the request's path (a path may have one route
    per method: GET and POST /api/v1/ablations); none for a path the document does not hold
    (the pages: their single route's Allow stands)."""
    path = request.url.path
    for template, item in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/}]+\\}", "[^/]+", re.escape(template)), path):
            return sorted(m.upper() for m in item if m in _HTTP_METHODS)
    return []


_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


_HEADINGS = {
    400: "bad request",
    401: "a token is needed",
    403: "token refused",
    404: "not found",
    405: "method not allowed",
    409: "refused",
    413: "too large",
    422: "invalid request",
    500: "server error",
    503: "service busy",
}


def _detail_text(detail: Any) -> str:
    """An error's JSON detail as one readable line."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field') or '.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
            if isinstance(d, dict)
            else str(d)
            for d in detail
        )
    if isinstance(detail, dict) and "message" in detail:
        return str(detail["message"])
    return str(detail)


def _page_aware(handler: Any) -> Any:
    """The handler's answer, or for a page (or a browser's GET) the same status as an HTML
    page with the same detail and a link home: the API keeps its JSON errors."""

    async def handle(request: Request, exc: Exception) -> Response:
        answer: Response = await handler(request, exc)
        if not wants_html(request):
            return answer
        detail = json.loads(bytes(answer.body)).get("detail") if answer.body else None
        if answer.status_code == 404 and isinstance(exc, StarletteHTTPException):
            detail = f"nothing is served at {request.url.path}"
        if answer.status_code == 401:
            detail = (
                f"{_detail_text(detail)}; in a browser, open the page once with ?token=<read token>"
            )
        status = answer.status_code
        headers = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        base = request.scope.get("root_path", "")
        page = error_page(status, _HEADINGS.get(status, "error"), _detail_text(detail), base)
        return HTMLResponse(page, status_code=status, headers=headers)

    return handle


def add_handlers(app: FastAPI) -> None:
    """Each refusal of the services and each database error, answered by its status (as a
    page where a browser asked for one)."""
    handlers: list[tuple[type[Exception], Any]] = [
        (StarletteHTTPException, _http_error),
        (RequestValidationError, _validation_error),
        (Invalid, _invalid),
        (NotFound, _not_found),
        (Conflict, _conflict),
        (Refused, _refused),
        (TooLarge, _too_large),
        (IntegrityError, _integrity_error),
        (OperationalError, _db_unavailable),
        (DBAPIError, _db_unavailable),
        (PoolTimeoutError, _pool_timeout),
    ]
    for kind, handler in handlers:
        app.add_exception_handler(kind, _page_aware(handler))
