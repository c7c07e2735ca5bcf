"""The receipt page of a run: `/runs/{id}/receipt` (summary figures, completeness and how
to complete it, observed backends per seam, model plan, runtime policy, environment,
attempts; links to the CSV export and the JSON receipt), its data at
`/ui/data/runs/{id}/receipt`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import receipt as figures
from service.api import pagekit
from service.api.deps import RunIdPath, SessionDep
from service.services import receipts, runs

router = APIRouter(include_in_schema=False)

EXPORTS = ("steps", "spans", "routing", "observations")  # export.csv?what=


@router.get("/runs/{run_id}/receipt", response_class=HTMLResponse)
def receipt_page(request: Request, session: SessionDep, run_id: RunIdPath) -> HTMLResponse:
    run = runs.get_run(session, run_id)
    api = f"{pagekit.root(request)}/api/v1/runs/{run_id}"
    return pagekit.html(
        request,
        "receipt.html",
        page="receipt",
        title=f"receipt · {run.name}",
        charts=False,  # tables only: no plotly.js to load
        run=pagekit.run_header(run),
        data_url=pagekit.data_url(request, f"/runs/{run_id}/receipt"),
        json_url=f"{api}/receipt",
        csv_urls=[(what, f"{api}/export.csv?what={what}") for what in EXPORTS],
    )


@router.get(pagekit.UI_DATA + "/runs/{run_id}/receipt")
def receipt_data(session: SessionDep, run_id: RunIdPath) -> Response:
    r = receipts.receipt(session, run_id).model_dump()
    verdict, missing = figures.completeness(r)
    observations, more = figures.observations_table(r["observed"])
    return pagekit.data(
        {
            **pagekit.live_fields(r["status"]),
            "tables": {
                "missing-table": missing,
                "seams-table": figures.seams_table(r["observed"]),
                "observations-table": observations,
                "plan-table": figures.kv_table(r["model_plan"], r["missing"], "model_plan"),
                "policy-table": figures.kv_table(
                    r["runtime_policy"], r["missing"], "runtime_policy"
                ),
                "environment-table": figures.kv_table(
                    r["environment"], r["missing"], "environment"
                ),
                "attempts-table": figures.attempts_table(r["attempts"]),
            },
            "texts": {
                **figures.summary_texts(r),
                "completeness": verdict,
                "seams-summary": figures.seams_summary(r["observed"]),
                "observations-more": more,
            },
        }
    )
