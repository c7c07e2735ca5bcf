"""The trends page: `/trends?project=&pattern=&lane=`, each run's figures over calendar time
(x: the run's start), one small chart each (dashboards/figures/trends.py, from
services/fleet.py); its data at `/ui/data/trends`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import trends as figures
from service.api import pagekit
from service.api.deps import SessionDep
from service.services import fleet

router = APIRouter(include_in_schema=False)

TREND_RUNS = 200  # the newest runs a trend draws

Text = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")]


def trend_filter(project: Text = None, pattern: Text = None, lane: Text = None) -> fleet.RunFilter:
    """The page's filters; empty fields are no filter."""
    return fleet.RunFilter.parse({"project": project, "pattern": pattern, "lane": lane})


Filters = Annotated[fleet.RunFilter, Depends(trend_filter)]


@router.get("/trends", response_class=HTMLResponse)
def trends_page(request: Request, session: SessionDep, flt: Filters) -> HTMLResponse:
    return pagekit.html(
        request,
        "trends.html",
        page="trends",
        title="trends",
        data_url=pagekit.data_url(request, "/trends", **flt.params()),
        filters=flt.params(),
        choices=fleet.choices(session)._asdict(),
        any_runs=fleet.any_run(session),
        server=str(request.base_url).rstrip("/"),
    )


@router.get(pagekit.UI_DATA + "/trends")
def trends_data(request: Request, session: SessionDep, flt: Filters) -> Response:
    got = fleet.listed(session, flt, fleet.cache_of(request.app.state), TREND_RUNS)
    rows = [{**r.model_dump(), **got.figures[r.run_id].as_dict()} for r in got.runs]
    live = any(r.status in pagekit.LIVE_STATUSES for r in got.runs) or not got.any_runs
    if not got.any_runs:
        note = ""  # the page says what to do
    elif not rows:
        note = "No runs match these filters: widen them, or show all runs."
    else:
        first, last = min(r["created_at"] for r in rows), max(r["created_at"] for r in rows)
        newest = f"the newest {len(rows)}, " if got.next_cursor else ""
        note = f"{len(rows)} run{'s' if len(rows) != 1 else ''} ({newest}started "
        note += f"{figures.day(first)} to {figures.day(last)})"
    return pagekit.data(
        {
            "figures": figures.trend_figures(rows, pagekit.root(request)),
            "texts": {"trend-note": note},
            "live": live,
            "ended": None if live else "no run here is running: not refreshing",
            "any_runs": got.any_runs,
            "matched": len(rows),
        }
    )
