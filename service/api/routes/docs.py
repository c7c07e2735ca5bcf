"""The API's documents: /openapi.json, /docs (Swagger UI 5, with its OAuth2 redirect) and
/redoc (ReDoc), served as routes of ours, their scripts and stylesheet from the installed
`fastapi_offline` package (made for FastAPI without a CDN: these machines, and many clusters,
reach none). With tokens configured, app.py includes this router behind the token check like
every other.

ReDoc's bundle draws its "API docs by Redocly" link with a logo from cdn.redoc.ly, whatever
the options: that one URL is replaced by our icon as the script is served (`REDOC_LOGO`), so
that the page asks nothing of another site.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Path, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse, Response

OPENAPI_URL = "/openapi.json"
REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/static/docs"
# The files of fastapi_offline that the pages load, and their media types.
ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "application/javascript",
    "favicon.png": "image/png",
}
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@lru_cache(maxsize=len(ASSETS))
def asset(name: str) -> bytes:
    """One file of the pages, from the installed package (ReDoc's with its logo ours)."""
    data = resources.files("fastapi_offline").joinpath("static", name).read_bytes()
    if name == "redoc.standalone.js":
        data = data.replace(REDOC_LOGO, f"{ASSETS_URL}/favicon.png".encode())
    return data


def router_for(app: FastAPI) -> APIRouter:
    """The documents of `app`, served as FastAPI serves them (FastAPI.setup), with the pages'
    files from this server."""
    router = APIRouter(include_in_schema=False)

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @router.get(OPENAPI_URL)
    def openapi(request: Request) -> JSONResponse:
        prefix, schema = root(request), app.openapi()
        if prefix and app.root_path_in_servers:
            server_urls = {s.get("url") for s in schema.get("servers", [])}
            if prefix not in server_urls:
                schema = {**schema, "servers": [{"url": prefix}, *schema.get("servers", [])]}
        return JSONResponse(schema)

    @router.get("/docs")
    def swagger_ui(request: Request) -> HTMLResponse:
        assets = root(request) + ASSETS_URL
        return get_swagger_ui_html(
            openapi_url=root(request) + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root(request) + REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )

    @router.get(REDIRECT_URL)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    def redoc(request: Request) -> HTMLResponse:
        assets = root(request) + ASSETS_URL
        return get_redoc_html(
            openapi_url=root(request) + OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    @router.get(ASSETS_URL + "/{name}")
    def docs_asset(name: Annotated[str, Path(max_length=64)]) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, detail=f"no documentation asset {name!r}")
        return Response(
            asset(name),
            media_type=ASSETS[name],
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return router
