"""The goodput page of a run: `/runs/{id}/goodput`, its figures at
`/ui/data/runs/{id}/goodput`: the headline and its cards, where the time went, the timeline
of attempts and ranks, rolling goodput, step time with the ideal step time, disruptions and
stragglers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dashboards.figures import goodput as figures
from dashboards.figures import timeline as gantt
from service.api import pagekit
from service.api.deps import RunIdPath, SessionDep
from service.services import accounting, runs, timeline

router = APIRouter(include_in_schema=False)

MAX_POINTS = 2000  # step-time points drawn, at most (services.runs.steps downsamples)


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: RunIdPath) -> RedirectResponse:
    """A run's address opens its first page, the goodput page (the API's is /api/v1/runs/{id})."""
    return RedirectResponse(f"{pagekit.root(request)}/runs/{run_id}/goodput", status_code=307)


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
    summary = runs.goodput(session, run_id)
    tl = timeline.timeline(session, run_id, accounting.whole_run(session, run_id))
    ends: dict[int, str | None] = dict(tl.attempt_ends)
    starts: dict[int, float] = {}
    for r in tl.rows:
        starts[r.attempt] = min(starts.get(r.attempt, r.start), r.start)
    rank = summary.rank if summary.rank is not None else 0
    points = [p.model_dump() for p in runs.steps(session, run_id, rank, MAX_POINTS).points]
    if tl.extent is not None:
        window_s = timeline.rolling_window_s(tl.extent[1] - tl.extent[0])
        windows = [w.model_dump() for w in runs.rolling_goodput(session, run_id, window_s).windows]
        rolling = figures.rolling_goodput(windows, window_s, starts, ends, summary.goodput_fraction)
    else:
        rolling = figures.rolling_goodput([], 0.0)
    plain = summary.model_dump()
    return pagekit.data(
        {
            **pagekit.live_fields(run.status),
            "figures": {
                "headline": figures.goodput_headline(plain),
                "badput": figures.badput_breakdown(plain),
                "timeline": gantt.goodput_timeline(tl.plain()),
                "rolling": rolling,
                "step_time": figures.step_time_series(points, x, ends, summary.ideal_step_time_s),
            },
            "tables": {
                "disruptions": figures.disruption_table(plain["disruptions"]),
                "stragglers": figures.straggler_table(plain["stragglers"], len(summary.ranks)),
            },
            "texts": figures.cards(plain),
        }
    )
