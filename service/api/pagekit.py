"""What every page route shares: the HTML answer on the shared layout, the data answer
(figure JSON) its script fetches, a run's header, the live flag, the x-axis choice.

Pages live at the paths users type (`/`, `/runs/{id}/goodput`, ...: negotiation.py lists
them), their data under `/ui/data/...`. Both stay out of the OpenAPI document: they are views of
the API's own answers, which the document describes."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from plotly.utils import PlotlyJSONEncoder

from dashboards import pages
from service.api.negotiation import UI_DATA

Axis = Literal["step", "time"]
AxisQuery = Annotated[
    Axis, Query(alias="x", description="x axis of the series: step number or wall clock")
]
LIVE_STATUSES = frozenset({"running", "stalled"})


def root(request: Request) -> str:
    """The app's root path (behind a proxy that mounts it under a prefix), '' otherwise."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def html(request: Request, template: str, *, page: str, title: str, **context: Any) -> HTMLResponse:
    """A page on the shared layout (dashboards/pages.py `render`), refreshing as often as
    the service's settings say (GOODPUT_PAGE_REFRESH_S)."""
    refresh_s = request.app.state.settings.page_refresh_s
    body = pages.render(
        template, page=page, title=title, base=root(request), refresh_s=refresh_s, **context
    )
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


def data_url(request: Request, path: str, **params: Any) -> str:
    """The URL of a page's data: `path` under /ui/data, with the query `params` that are
    set."""
    from urllib.parse import urlencode

    query = urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
    return f"{root(request)}{UI_DATA}{path}" + (f"?{query}" if query else "")


def data(body: dict[str, Any]) -> Response:
    """A page's data: {figures: {element id: figure}, tables: {...}, texts: {...}, live,
    status, ended}; figures may be `go.Figure`s (serialised by Plotly's encoder)."""
    if "figures" in body:
        body = {
            **body,
            "figures": {
                k: f.to_plotly_json() if hasattr(f, "to_plotly_json") else f
                for k, f in body["figures"].items()
            },
        }
    return Response(
        json.dumps(body, cls=PlotlyJSONEncoder),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def run_header(run: Any) -> dict[str, Any]:
    """What the shared header shows of a run (a RunSummary or RunRead)."""
    return {
        "run_id": run.run_id,
        "name": run.name,
        "project": run.project,
        "status": run.status,
        "tags": list(run.tags),
    }


def live_fields(status: str) -> dict[str, Any]:
    """`live` (fetch again) while the run runs or has stalled; once it ended, why the page
    stopped refreshing."""
    if status in LIVE_STATUSES:
        return {"live": True, "status": status, "ended": None}
    return {"live": False, "status": status, "ended": f"run {status}: not refreshing"}
