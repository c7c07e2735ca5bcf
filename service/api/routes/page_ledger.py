"""The feature ledger page: `/ledger?project=`, every knob value ever ablated with its
standing, whether it needs re-review, every verdict it had and the trend of its step-time
ratio over time (dashboards/figures/ledger.py, from services/ablations.py `ledger`, as
`GET /api/v1/ledger` answers); its data at `/ui/data/ledger`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import ledger as figures
from service.api import pagekit
from service.api.deps import SessionDep
from service.services import ablations, fleet

router = APIRouter(include_in_schema=False)

EXAMPLE = "goodput ablate --knob dispatch=grouped,padded --repeats 3 --steps 60"

Project = Annotated[
    str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="only this project's")
]


def _project(project: str | None) -> str | None:
    return project.strip() or None if project else None


@router.get("/ledger", response_class=HTMLResponse)
def ledger_page(request: Request, session: SessionDep, project: Project = None) -> HTMLResponse:
    chosen = _project(project)
    return pagekit.html(
        request,
        "ledger.html",
        page="ledger",
        title="feature ledger" + (f" · {chosen}" if chosen else ""),
        data_url=pagekit.data_url(request, "/ledger", project=chosen),
        project=chosen or "",
        projects=fleet.choices(session).projects,
        example=EXAMPLE,
    )


@router.get(pagekit.UI_DATA + "/ledger")
def ledger_data(request: Request, session: SessionDep, project: Project = None) -> Response:
    """The standings, the verdicts, the trend; what standings are checked against."""
    got = ablations.ledger(session, fleet.cache_of(request.app.state), _project(project))
    entries = [e.model_dump() for e in got.entries]
    base = pagekit.root(request)
    review = sum(e["needs_rereview"] for e in entries)
    note, rereview = figures.notes(entries, got.newest_environment)
    return pagekit.data(
        {
            "figures": {"ledger-trend": figures.trend_figure(entries)},
            "tables": {
                "standings": figures.standing_table(entries, base),
                "history": figures.history_table(entries, base),
            },
            "texts": {"ledger-note": note, "rereview-note": rereview},
            "any": bool(entries),
            "rereview": review,
            "live": False,
            "status": None,
            "ended": None,
        }
    )
