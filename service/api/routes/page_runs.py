"""The runs page, the home page: `/` (and `/runs`, which sends there), a sortable and
filterable table of the runs with their figures (services/fleet.py), a check box per run to
compare two; its data at `/ui/data/runs`. The filters are the page's query fields (name,
project, status, tag, pattern, lane, from, to), so a filtered view can be shared."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dashboards.figures import runs as figures
from service.api import pagekit
from service.api.deps import SessionDep
from service.services import fleet

router = APIRouter(include_in_schema=False)

PAGE_RUNS = 100  # runs per page of the list (older ones: the next page's link)

Text = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")]
Day = Annotated[str | None, Query(max_length=10, description="a UTC date, YYYY-MM-DD")]
Cursor = Annotated[str | None, Query(max_length=1000, pattern=r"^[A-Za-z0-9_-]*$")]


def run_filter(
    name: Text = None,
    project: Text = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    tag: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$")] = None,
    pattern: Text = None,
    lane: Text = None,
    since: Annotated[str | None, Query(alias="from", max_length=10)] = None,
    until: Annotated[str | None, Query(alias="to", max_length=10)] = None,
) -> fleet.RunFilter:
    """The page's filters; empty fields are no filter, a bad one a 422 naming it."""
    raw = {"name": name, "project": project, "status": status, "tag": tag}
    raw.update({"pattern": pattern, "lane": lane, "from": since, "to": until})
    return fleet.RunFilter.parse(raw)


Filters = Annotated[fleet.RunFilter, Depends(run_filter)]


def server_url(request: Request) -> str:
    """This service's address as the browser reached it (what `goodput train --server`
    takes)."""
    return str(request.base_url).rstrip("/")


@router.get("/", response_class=HTMLResponse)
def runs_page(
    request: Request, session: SessionDep, flt: Filters, cursor: Cursor = None
) -> HTMLResponse:
    fleet.check_cursor(cursor)
    return pagekit.html(
        request,
        "runs.html",
        page="runs",
        title="runs",
        charts=False,  # a table: no plotly.js to load
        data_url=pagekit.data_url(request, "/runs", cursor=cursor, **flt.params()),
        filters=flt.params(),
        choices=fleet.choices(session)._asdict(),
        statuses=fleet.RUN_STATUSES,
        any_runs=fleet.any_run(session),
        server=server_url(request),
        help=figures.HELP,
    )


@router.get("/runs", response_class=RedirectResponse)
def runs_alias(request: Request) -> RedirectResponse:
    """`/runs` is the home page, with the same query."""
    query = request.url.query
    return RedirectResponse(pagekit.root(request) + "/" + (f"?{query}" if query else ""), 307)


@router.get(pagekit.UI_DATA + "/runs")
def runs_data(
    request: Request, session: SessionDep, flt: Filters, cursor: Cursor = None
) -> Response:
    base = pagekit.root(request)
    got = fleet.listed(session, flt, fleet.cache_of(request.app.state), PAGE_RUNS, cursor)
    rows = [{**r.model_dump(), **got.figures[r.run_id].as_dict()} for r in got.runs]
    live = not got.any_runs or any(r.status in pagekit.LIVE_STATUSES for r in got.runs)
    count = f"{len(rows)} run{'s' if len(rows) != 1 else ''}"
    nxt = None
    if got.next_cursor:
        count += " shown, newest first"
        nxt = f"{base}/?" + urlencode({**flt.params(), "cursor": got.next_cursor})
    return pagekit.data(
        {
            "tables": {"runs": figures.runs_table(rows, base, filtered=flt.active)},
            "texts": {"runs-count": count if rows else ""},
            "live": live,
            "ended": None if live else "no listed run is running: not refreshing",
            "names": {r["run_id"]: r["name"] for r in rows},
            "next": nxt,
            "any_runs": got.any_runs,
        }
    )
