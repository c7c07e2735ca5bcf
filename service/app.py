"""Application factory: the routers, the error handlers, the middleware and the OpenAPI
document, wired to one database (settings.py says which)."""

from __future__ import annotations

import gc
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, SecretStr
from sqlalchemy import Engine

from service.api.errors import ERROR_MODELS, add_handlers, error_response
from service.api.middleware import AdmissionLimit, BodyLimit, HeadAsGet, IngestRefusals
from service.api.routes import (
    ablations,
    compare,
    dashboards,
    docs,
    health,
    imports,
    ingest,
    metrics,
    page_ablations,
    page_compare,
    page_goodput,
    page_ledger,
    page_performance,
    page_receipt,
    page_routing,
    page_runs,
    page_trends,
    receipts,
    runs,
)
from service.api.security import READ_METHODS, SessionCookie, TokenCheck
from service.services.fleet import FleetCache
from service.services.metrics import ServiceMetrics
from service.settings import Settings
from service.store.db import make_sessionmaker
from service.store.migrate import prepare_database
from trainer_hooks.records import ContractJsonSchema

ROUTERS = (health, ingest, runs, receipts, compare, ablations, imports, dashboards, metrics)
# the pages (api/negotiation.py lists their paths); their data under /ui/data
PAGES = (
    page_runs,
    page_goodput,
    page_performance,
    page_routing,
    page_receipt,
    page_compare,
    page_trends,
    page_ablations,
    page_ledger,
)
OPEN_ROUTERS = (health,)  # every other route needs a token when tokens are configured


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; prepares (and for SQLite, migrates) the database unless an engine is
    given."""
    settings = settings or Settings()
    if engine is None:
        engine = prepare_database(settings.database_url, settings.auto_migrate_sqlite, db=settings)
    check = _token_check(settings)
    # The documents are routes of ours (api/routes/docs.py): Swagger UI from an installed
    # package, not a CDN, and with tokens behind the check like every other route.
    app = FastAPI(
        title="goodput",
        version="0.1.0",
        description="Goodput, badput and receipts of Mixture-of-Experts training runs.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.metrics = ServiceMetrics(app.state.sessionmaker)
    app.state.fleet_cache = FleetCache()  # the runs and trends pages' per-run figures
    guard = [Depends(check)] if check else []
    app.include_router(docs.router_for(app), dependencies=guard)
    if check:
        check.guard_unmatched(app)
    for area in (*ROUTERS, *PAGES):
        app.include_router(area.router, dependencies=[] if area in OPEN_ROUTERS else guard)
    _document(app, settings)
    add_handlers(app)
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
    (`ingest.DOCUMENTED_BODIES`) and of error responses (`errors.ERROR_MODELS`) in the
    components, where the routes' `$ref`s point; with tokens configured, the 401 and 403 of
    each route that takes one (FastAPI writes the rest from security.TokenCheck)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # which caches it in app.openapi_schema
        parts = schema.setdefault("components", {}).setdefault("schemas", {})
        models: tuple[type[BaseModel], ...] = (*ingest.DOCUMENTED_BODIES, *ERROR_MODELS)
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
    """The 401 and 403 of every operation that takes a token (FastAPI writes the
    `securitySchemes` and each operation's `security` from security.TokenCheck)."""
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if not operation.get("security"):
                continue
            needs = "the write token" if method.upper() not in READ_METHODS else "a token"
            operation["responses"].update(
                {
                    "401": error_response(401, f"no token was sent: this route needs {needs}"),
                    "403": error_response(403),
                }
            )


def _token_check(settings: Settings) -> TokenCheck | None:
    if not settings.auth_enabled:
        return None
    return TokenCheck(_secret(settings.write_token), _secret(settings.read_token))


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """From the outside in: HEAD as GET, CORS, the dashboards' cookie (with tokens),
    admission, ingest refusals, body limit (Starlette runs the last added first): a request
    past the server's capacity waits a bounded time (AdmissionLimit), and the refusal counter
    sees the body limit's 413s. Tokens are checked by a dependency of the routes
    (security.TokenCheck), before any body is read."""
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
        app.add_middleware(SessionCookie)
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
