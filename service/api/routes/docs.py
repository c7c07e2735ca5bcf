"""The API's documents when tokens are configured: /openapi.json, /docs and /redoc as routes
of ours, so that the token check guards them like every other route (without tokens FastAPI
serves them itself)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse


def router_for(app: FastAPI) -> APIRouter:
    """/openapi.json, /docs (with its OAuth2 redirect) and /redoc of `app`, served as FastAPI
    serves them (FastAPI.setup) but as routes of a router, which the token check can guard."""
    router = APIRouter(include_in_schema=False)
    openapi_url, redirect_url = "/openapi.json", "/docs/oauth2-redirect"

    @router.get(openapi_url)
    def openapi(request: Request) -> JSONResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        schema = app.openapi()
        if root_path and app.root_path_in_servers:
            server_urls = {s.get("url") for s in schema.get("servers", [])}
            if root_path not in server_urls:
                schema = {**schema, "servers": [{"url": root_path}, *schema.get("servers", [])]}
        return JSONResponse(schema)

    @router.get("/docs")
    def swagger_ui(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root_path + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root_path + redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @router.get(redirect_url)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    def redoc(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=root_path + openapi_url, title=f"{app.title} - ReDoc")

    return router
