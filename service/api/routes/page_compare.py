"""The compare page: `/compare?baseline=&candidate=` (a picker without both), its data at
`/ui/data/compare` with the same parameters as `GET /api/v1/compare`. A refusal (incomplete
receipt, lane mismatch) is part of the page's data, with what would fix it, not an error."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import compare as figures
from dashboards.figures import compare_tables as tables
from dashboards.figures.common import empty
from service.api import pagekit
from service.api.deps import RunIdQuery, SessionDep
from service.schemas import RunRead
from service.services import compare, receipts, runs
from service.services.errors import Invalid, Refused
from trainer_hooks.records import ID_PATTERN

router = APIRouter(include_in_schema=False)

# Per run: the series' sizes the store answers from its coarsest rollups on a long run (on
# 1,000,000 steps: steps in 16 ms at 320 points against 120 ms at 1,000; 12 layers' routing
# in 56 ms at 320 points against 1.5 s at 500), and drop-rate bins coarser than the routing
# series' buckets (about half its points), so that each bin pools every layer.
STEP_POINTS = 320
ROUTING_POINTS = 320
DROP_BINS = 100
PICKER_RUNS = 100

Knobs = Annotated[
    list[str],
    Query(max_length=64, description="a receipt field the runs may differ in (repeatable)"),
]
Margin = Annotated[float, Query(ge=0.0, le=0.5)]
LossTolerance = Annotated[float, Query(ge=0.0, le=1.0)]
MaybeId = Annotated[str | None, Query(max_length=128, description="a run's id; empty: pick one")]


def _chosen(field: str, value: str | None) -> str | None:
    """An id given, None when left empty (the picker's blank choice)."""
    if value is None or not value.strip():
        return None
    if not re.match(ID_PATTERN, value):
        raise Invalid.field("query", field, f"not a run id: must match {ID_PATTERN}")
    return value


def _knobs(knob: list[str]) -> list[str]:
    return list(dict.fromkeys(k.strip() for k in knob if k.strip()))


def _choice(knob: list[str], allow: bool, margin: float, loss_tolerance: float) -> dict[str, Any]:
    return {
        "knobs": knob,
        "allow_lane_mismatch": allow,
        "margin": margin,
        "loss_tolerance": loss_tolerance,
    }


def _data_url(request: Request, baseline: str, candidate: str, choice: dict[str, Any]) -> str:
    """The page's data address, with the choices that differ from the defaults."""
    margin, tolerance = choice["margin"], choice["loss_tolerance"]
    return pagekit.data_url(
        request,
        "/compare",
        baseline=baseline,
        candidate=candidate,
        knob=choice["knobs"] or None,
        allow_lane_mismatch="true" if choice["allow_lane_mismatch"] else None,
        margin=None if margin == figures.DEFAULT_MARGIN else margin,
        loss_tolerance=None if tolerance == figures.DEFAULT_LOSS_TOLERANCE else tolerance,
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    baseline: MaybeId = None,
    candidate: MaybeId = None,
    knob: Knobs = [],  # noqa: B006 (FastAPI copies it)
    allow_lane_mismatch: bool = False,
    margin: Margin = figures.DEFAULT_MARGIN,
    loss_tolerance: LossTolerance = figures.DEFAULT_LOSS_TOLERANCE,
) -> HTMLResponse:
    base_id, cand_id = _chosen("baseline", baseline), _chosen("candidate", candidate)
    knobs = _knobs(knob)
    picked = {
        role: runs.get_run(session, i)
        for role, i in (("baseline", base_id), ("candidate", cand_id))
        if i
    }
    recent = runs.list_runs(session, limit=PICKER_RUNS).runs
    listed = {r.run_id for r in recent}
    options = [*recent, *(r for r in picked.values() if r.run_id not in listed)]
    compared = base_id is not None and cand_id is not None
    choice = _choice(knobs, allow_lane_mismatch, margin, loss_tolerance)
    data_url = _data_url(request, base_id, cand_id, choice) if base_id and cand_id else None
    title = (
        f"compare · {picked['baseline'].name} vs {picked['candidate'].name}"
        if compared
        else "compare"
    )
    return pagekit.html(
        request,
        "compare.html",
        page="compare",
        title=title,
        data_url=data_url,
        compared=compared,
        options=[pagekit.run_header(r) for r in options],
        picked={
            role: pagekit.run_header(r) if (r := picked.get(role)) else None
            for role in figures.ROLES
        },
        choice=choice,
    )


def _rank(run: RunRead) -> int:
    """The rank whose series are drawn: the lowest one (the receipt's reference rank)."""
    return min((a.rank for a in run.attempts), default=0)


def _ends(run: RunRead, rank: int) -> dict[int, str | None]:
    """How each attempt of the rank ended, for the restart marks: its end record's status
    and cause; an attempt without one that a later attempt followed was restarted."""
    mine = [a for a in run.attempts if a.rank == rank]
    last = max((a.attempt for a in mine), default=0)
    ends: dict[int, str | None] = {}
    for a in mine:
        said = ": ".join(x for x in (a.status, a.cause) if x) or None
        ends[a.attempt] = said or ("no end record, restarted" if a.attempt < last else None)
    return ends


def _series(session: SessionDep, run: RunRead) -> tuple[list[dict[str, Any]], Any, bool]:
    rank = _rank(run)
    steps = runs.steps(session, run.run_id, rank=rank, max_points=STEP_POINTS)
    routing = receipts.routing(session, run.run_id, None, ROUTING_POINTS, rank)
    drops, sampled = figures.drop_rate_series(routing, DROP_BINS)
    return [p.model_dump() for p in steps.points], drops, sampled


def _overlays(session: SessionDep, pair: dict[str, RunRead]) -> dict[str, Any]:
    steps, drops, sampled = {}, {}, []
    for role, run in pair.items():
        steps[role], drops[role], was_sampled = _series(session, run)
        if was_sampled:
            sampled.append(role)
    ends = {role: _ends(run, _rank(run)) for role, run in pair.items()}
    note = "dropped / routed assignments, all E layers"
    if sampled:
        note += f"; {' and '.join(sampled)}: binned estimate (downsampled)"
    return {
        "step_time": figures.overlay(
            "Step time", steps, lambda p: 1000.0 * float(p["step_time_s"]), "ms", ends
        ),
        "loss": figures.overlay("Loss", steps, lambda p: p.get("loss"), "loss", ends),
        "drop_rate": figures.overlay(
            "Drop rate (all E layers)",
            drops,
            lambda p: 100.0 * float(p["drop_rate"]),
            "% dropped",
            ends,
            note,
        ),
    }


def _live(pair: dict[str, RunRead]) -> dict[str, Any]:
    statuses = {role: run.status for role, run in pair.items()}
    live = any(s in pagekit.LIVE_STATUSES for s in statuses.values())
    ended = None if live else "both runs ended: not refreshing"
    return {"live": live, "status": None, "ended": ended, "statuses": statuses}


def _verdict(result: dict[str, Any], margin: float) -> dict[str, Any]:
    """The verdict's part of the data: the verdict and its reasons, the ratios, badput, the
    summary and the lane's differing fields."""
    step_time, tokens = figures.ratio_rows(result)
    return {
        "verdict": {"verdict": result["verdict"], "reasons": result["reasons"]},
        "figures": {
            "ratios": figures.ratio_forest(result, margin),
            "badput": figures.badput_bars(result),
        },
        "tables": {
            "summary": tables.summary_table(result),
            "lane_diff": tables.lane_table(result["lane_diff"], result["knobs"]),
        },
        "texts": {
            "ratio-step_time": figures.ratio_text(step_time),
            "ratio-tokens": figures.ratio_text(tokens),
        },
    }


def _refusal(
    request: Request, detail: dict[str, Any], pair: dict[str, RunRead], choice: dict[str, Any]
) -> dict[str, Any]:
    """The refusal's part of the data: why, what each run lacks or where they differ, and
    the links that would give a verdict; the verdict's charts say there is none."""
    parts = ("model_plan", "runtime_policy", "environment")
    runs_view = {
        role: {"run_id": r.run_id, "name": r.name, "parts": {k: getattr(r, k) for k in parts}}
        for role, r in pair.items()
    }
    view = tables.refusal_view(detail, runs_view, choice, pagekit.root(request))
    note = "no verdict: see why above"
    return {
        "refusal": {"error": view["error"], "fixes": view["fixes"]},
        "figures": {
            "ratios": empty("Candidate / baseline, 95% intervals", note),
            "badput": empty("Badput by category (seconds)", note),
        },
        "tables": {"refusal-table": view["table"]} if view["table"] else {},
        "texts": {"refusal-title": view["title"], "refusal-message": view["message"]},
    }


@router.get(pagekit.UI_DATA + "/compare")
def compare_data(
    request: Request,
    session: SessionDep,
    baseline: RunIdQuery,
    candidate: RunIdQuery,
    knob: Knobs = [],  # noqa: B006 (FastAPI copies it)
    allow_lane_mismatch: bool = False,
    margin: Margin = figures.DEFAULT_MARGIN,
    loss_tolerance: LossTolerance = figures.DEFAULT_LOSS_TOLERANCE,
) -> Response:
    """The verdict, or the refusal with what would fix it (a 200 either way), and both
    runs' series overlaid."""
    knobs = _knobs(knob)
    choice = _choice(knobs, allow_lane_mismatch, margin, loss_tolerance)
    pair = {
        "baseline": runs.get_run(session, baseline),
        "candidate": runs.get_run(session, candidate),
    }
    try:
        result = compare.compare_runs(
            session, baseline, candidate, knobs, allow_lane_mismatch, margin, loss_tolerance
        )
    except Refused as refused:
        part = _refusal(request, refused.detail, pair, choice)
    else:
        part = _verdict(result.model_dump(), margin)
    return pagekit.data(
        {
            **_live(pair),
            "verdict": part.get("verdict"),
            "refusal": part.get("refusal"),
            "figures": {**_overlays(session, pair), **part["figures"]},
            "tables": part["tables"],
            "texts": {"knobs": ", ".join(knobs) or "none declared", **part["texts"]},
        }
    )
