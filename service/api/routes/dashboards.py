"""The pages' files (plotly.js from an installed package; the layout's script,
style sheet and icon from dashboards/static) and the old address of the goodput page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response

from dashboards import pages
from service.api.pagekit import root
from trainer_hooks.records import ID_PATTERN

router = APIRouter()
_CACHE = {"Cache-Control": "public, max-age=3600"}


@router.get("/static/plotly.min.js", include_in_schema=False)
def plotly_js() -> Response:
    """plotly.js from an installed package (dashboards/pages.py `plotly_js`), never a CDN."""
    bundle = pages.plotly_js()
    headers = {**_CACHE, "X-Goodput-Bundle": bundle.name}
    return Response(bundle.body, media_type="application/javascript", headers=headers)


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    """The layout's script, style sheet and icon (dashboards/static, listed by name)."""
    try:
        body = pages.static_file(name)
    except KeyError:
        raise HTTPException(404, f"no static file {name!r}") from None
    return Response(body, media_type=pages.STATIC_FILES[name], headers=_CACHE)


@router.get("/dashboards/goodput", include_in_schema=False)
def goodput_dashboard(
    request: Request,
    run_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> RedirectResponse:
    """The goodput page's first address: now `/runs/{id}/goodput` (and `/` for the list)."""
    target = f"/runs/{run_id}/goodput" if run_id else "/"
    return RedirectResponse(root(request) + target, status_code=307)
