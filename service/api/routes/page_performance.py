"""The performance page of a run: `/runs/{id}/performance`, its figures at
`/ui/data/runs/{id}/performance`: step time against the ideal, tokens/s, TFLOP/s, MFU,
device against host time, peak memory, step time per rank as a heatmap, recompiles."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import performance as figures
from service.api import pagekit
from service.api.deps import RunIdPath, SessionDep
from service.services import accounting, performance, runs, timeline

router = APIRouter(include_in_schema=False)

MAX_POINTS = 2000  # points per series drawn, at most (services.runs.steps downsamples)


@router.get("/runs/{run_id}/performance", response_class=HTMLResponse)
def performance_page(
    request: Request, session: SessionDep, run_id: RunIdPath, x: pagekit.AxisQuery = "step"
) -> HTMLResponse:
    run = runs.get_run(session, run_id)
    return pagekit.html(
        request,
        "performance.html",
        page="performance",
        title=f"performance · {run.name}",
        run=pagekit.run_header(run),
        axis=x,
        data_url=pagekit.data_url(request, f"/runs/{run_id}/performance", x=x),
    )


@router.get(pagekit.UI_DATA + "/runs/{run_id}/performance")
def performance_data(
    session: SessionDep, run_id: RunIdPath, x: pagekit.AxisQuery = "step"
) -> Response:
    run = runs.get_run(session, run_id)
    summary = runs.goodput(session, run_id)
    ends: dict[int, str | None] = dict(timeline.attempt_ends(accounting.whole_run(session, run_id)))
    grid = performance.step_grid(session, run_id, x)
    rank = grid.ranks[0] if grid.ranks else 0  # the lowest rank with steps
    points = [p.model_dump() for p in runs.steps(session, run_id, rank, MAX_POINTS).points]
    timed = runs.steps(session, run_id, rank, MAX_POINTS, metric="device_time_s").points
    device = run.environment.get("device")
    device = str(device) if device is not None else None
    recompiles = performance.recompiles(session, run_id).plain()
    ideal = summary.ideal_step_time_s if summary.rank == rank else None
    return pagekit.data(
        {
            **pagekit.live_fields(run.status),
            "figures": {
                "step_time": figures.step_time_band(
                    points, x, ends, ideal, summary.step_time_deviation_s if ideal else None
                ),
                "tokens_per_s": figures.tokens_per_s(points, x, ends),
                "tflops": figures.tflops(points, x, ends),
                "mfu": figures.mfu(points, x, ends, performance.peak_note(run.environment)),
                "device_host": figures.device_vs_host(
                    points, x, ends, device, [p.model_dump() for p in timed]
                ),
                "memory": figures.memory(grid.plain(), rank, ends, device),
                "heatmap": figures.rank_heatmap(
                    grid.plain(), ends, [s.rank for s in summary.stragglers]
                ),
            },
            "tables": {"recompiles": figures.recompile_table(recompiles)},
            "texts": {
                "recompile-note": figures.recompile_note(recompiles),
                "series-rank": f"rank {rank}",
            },
        }
    )
