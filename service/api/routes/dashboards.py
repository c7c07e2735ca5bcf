"""Dashboard routes: pages, their figure JSON, and plotly.js from the installed package. The
data comes from services/, as the REST routes' does."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from plotly.utils import PlotlyJSONEncoder

from dashboards import figures
from dashboards.pages import goodput_page
from service.api.deps import RunIdQuery, SessionDep
from service.api.errors import RUN_ERRORS, errors
from service.services import runs
from trainer_hooks.records import ID_PATTERN

router = APIRouter()


@lru_cache(maxsize=1)
def _plotly_js() -> bytes:
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()


@router.get("/static/plotly.min.js", include_in_schema=False)
def plotly_js() -> Response:
    """plotly.js from the plotly package: these machines have no CDN."""
    return Response(
        _plotly_js(),
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/dashboards/goodput", response_class=HTMLResponse, responses=errors(*RUN_ERRORS))
def goodput_dashboard(
    request: Request,
    session: SessionDep,
    run_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> HTMLResponse:
    """Goodput dashboard of one run (the newest when none is named)."""
    listed = runs.list_runs(session, limit=100).runs
    if run_id is None:
        run = listed[0].model_dump() if listed else None
    else:
        run = runs.get_run(session, run_id).model_dump()
    server = str(request.base_url).rstrip("/")
    return HTMLResponse(goodput_page(run, [r.model_dump() for r in listed], server))


@router.get("/dashboards/goodput/data", responses=errors(*RUN_ERRORS))
def goodput_data(session: SessionDep, run_id: RunIdQuery) -> Response:
    """Figure JSON of the goodput dashboard, for first draw and live refresh."""
    summary = runs.goodput(session, run_id).model_dump()
    points = [p.model_dump() for p in runs.steps(session, run_id, max_points=2000).points]
    figs = {
        "headline": figures.goodput_headline(summary),
        "badput": figures.badput_breakdown(summary),
        "step_time": figures.step_time_series(points),
    }
    body: dict[str, Any] = {
        "run_id": run_id,
        "summary": summary,
        "figures": {k: f.to_plotly_json() for k, f in figs.items()},
    }
    return Response(json.dumps(body, cls=PlotlyJSONEncoder), media_type="application/json")
