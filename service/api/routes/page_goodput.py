"""The goodput page of a run: `/runs/{id}/goodput`, its figures at
`/ui/data/runs/{id}/goodput`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import goodput as figures
from service.api import pagekit
from service.api.deps import RunIdPath, SessionDep
from service.services import runs

router = APIRouter(include_in_schema=False)


@router.get("/runs/{run_id}/goodput", response_class=HTMLResponse)
def goodput_page(
    request: Request, session: SessionDep, run_id: RunIdPath, x: pagekit.AxisQuery = "step"
) -> HTMLResponse:
    run = runs.get_run(session, run_id)
    return pagekit.html(
        request,
        "goodput.html",
        page="goodput",
        title=f"goodput · {run.name}",
        run=pagekit.run_header(run),
        axis=x,
        data_url=pagekit.data_url(request, f"/runs/{run_id}/goodput", x=x),
    )


@router.get(pagekit.UI_DATA + "/runs/{run_id}/goodput")
def goodput_data(session: SessionDep, run_id: RunIdPath, x: pagekit.AxisQuery = "step") -> Response:
    run = runs.get_run(session, run_id)
    summary = runs.goodput(session, run_id).model_dump()
    points = [p.model_dump() for p in runs.steps(session, run_id, max_points=2000).points]
    ends = {a.attempt: a.status for a in run.attempts if a.rank == 0}
    return pagekit.data(
        {
            **pagekit.live_fields(run.status),
            "figures": {
                "headline": figures.goodput_headline(summary),
                "badput": figures.badput_breakdown(summary),
                "step_time": figures.step_time_series(points, x, ends),
            },
        }
    )
