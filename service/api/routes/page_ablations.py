"""The ablation pages: `/ablations?project=` (every ablation, newest first) and
`/ablations/{id}` (the page a user watches while `goodput ablate` runs: progress, each cell's
runs, each cell's verdict against the baseline cell, the step-time ratios per cell), each
with its data under `/ui/data` (dashboards/figures/ablations.py, from
services/ablations.py, as `GET /api/v1/ablations[/{id}]` answer).

An ablation's page stays live while any of its runs runs, and, while fewer runs than the
declared cells x repeats have started, for WAIT_S after its newest run started (the next
run of `goodput ablate` starts a moment after the one before ends)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import ablations as figures
from service.api import pagekit
from service.api.deps import SessionDep
from service.services import ablations
from service.services.fleet import cache_of
from trainer_hooks.records import ID_PATTERN

router = APIRouter(include_in_schema=False)

WAIT_S = 15 * 60  # how long a page waits for an ablation's next run to start
EXAMPLE = "goodput ablate --knob dispatch=grouped,padded --repeats 3 --steps 60"

Project = Annotated[
    str | None, Query(max_length=200, pattern=r"^[^\x00]*$", description="only this project's")
]
AblationIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="the ablation's id")]


def _project(project: str | None) -> str | None:
    return project.strip() or None if project else None


@router.get("/ablations", response_class=HTMLResponse)
def ablations_page(request: Request, project: Project = None) -> HTMLResponse:
    chosen = _project(project)
    return pagekit.html(
        request,
        "ablations.html",
        page="ablations",
        title="ablations",
        data_url=pagekit.data_url(request, "/ablations", project=chosen),
        charts=False,
        project=chosen or "",
        example=EXAMPLE,
        server=str(request.base_url).rstrip("/"),
    )


@router.get(pagekit.UI_DATA + "/ablations")
def ablations_data(request: Request, session: SessionDep, project: Project = None) -> Response:
    """The ablations' table; live while any of their runs has not ended."""
    got = ablations.list_ablations(session, _project(project)).ablations
    rows = [a.model_dump() for a in got]
    live = any(a.runs_ended < a.runs for a in got)
    running = sum(a.runs - a.runs_ended for a in got)
    note = f"{len(rows)} ablation{'s' * (len(rows) != 1)}" if rows else ""
    if running:
        note += f"; {running} run{'s' * (running != 1)} not ended yet"
    return pagekit.data(
        {
            "tables": {"ablation-list": figures.ablation_table(rows, pagekit.root(request))},
            "texts": {"ablation-note": note},
            "any": bool(rows),
            "live": live,
            "status": None,
            "ended": None if live else "no run of these is running: not refreshing",
        }
    )


@router.get("/ablations/{ablation_id}", response_class=HTMLResponse)
def ablation_page(
    request: Request, session: SessionDep, ablation_id: AblationIdPath
) -> HTMLResponse:
    got = ablations.read(session, cache_of(request.app.state), ablation_id, judge=False)
    return pagekit.html(
        request,
        "ablation.html",
        page="ablation",
        title=f"ablation · {got.name}",
        data_url=pagekit.data_url(request, f"/ablations/{ablation_id}"),
        ablation={
            "ablation_id": got.ablation_id,
            "name": got.name,
            "project": got.project,
            "created": figures.when(got.created_at),
            "declared": got.declared,
            "knobs": figures.knobs_text(got.knobs),
            "baseline_cell": got.baseline_cell,
            "repeats": got.repeats,
            "settings": ", ".join(f"{k}={v}" for k, v in got.settings.items()),
        },
        example=EXAMPLE,
    )


def _live(got: dict[str, Any], now: float) -> tuple[bool, str | None]:
    """Live while a run runs, or while runs are still to start and the newest started less
    than WAIT_S ago; else why the page stopped refreshing."""
    runs = [r for c in got["cells"] for r in c["runs"]]
    if any(r["status"] in pagekit.LIVE_STATUSES for r in runs):
        return True, None
    expected = got["expected_runs"]
    newest = max((r["created_at"] for r in runs), default=got["created_at"])
    if expected is not None and len(runs) < expected:
        if now - newest < WAIT_S:
            return True, None
        return False, (
            f"{len(runs)} of {expected} runs started, none in the last {WAIT_S // 60} min: "
            "not refreshing (reload once more runs start)"
        )
    return False, "every run ended: not refreshing"


@router.get(pagekit.UI_DATA + "/ablations/{ablation_id}")
def ablation_data(request: Request, session: SessionDep, ablation_id: AblationIdPath) -> Response:
    """Progress, each cell's view (runs, verdict or why none), the step-time forest."""
    got = ablations.read(session, cache_of(request.app.state), ablation_id).model_dump()
    live, ended = _live(got, time.time())
    expected = got["expected_runs"]
    return pagekit.data(
        {
            "figures": {"forest": figures.cell_forest(got)},
            "texts": {
                "progress-text": figures.progress_text(got["runs"], got["runs_ended"], expected),
            },
            "progress": {"ended": got["runs_ended"], "of": expected or max(got["runs"], 1)},
            "cells": figures.cell_views(got, pagekit.root(request)),
            "any_runs": got["runs"] > 0,
            "live": live,
            "status": None,
            "ended": ended,
        }
    )
