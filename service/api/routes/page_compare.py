"""The compare page: `/compare?baseline=&candidate=` (each side a run id or replicates' ids,
comma-separated) or `/compare?ablation=ID&baseline=CELL&candidate=CELL` (two cells of an
ablation), a picker without both sides; its data at `/ui/data/compare` with the same
parameters as `GET /api/v1/compare`. A refusal (incomplete receipt, replicates of mixed
lanes, lane mismatch) is part of the page's data, with what would fix it, not an error."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from dashboards.figures import compare as figures
from dashboards.figures import compare_tables as tables
from dashboards.figures.common import empty
from service.api import pagekit
from service.api.deps import CompareSide, SessionDep
from service.calc.knobs import KNOBS
from service.schemas import AblationRead, RunRead
from service.services import ablations, compare, receipts, runs
from service.services.errors import NotFound, Refused
from service.services.fleet import cache_of
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
PICKER_ABLATIONS = 50
OVERLAY_RUNS = 8  # runs a side drawn on the overlays (the verdict takes every one)

Knobs = Annotated[
    list[str],
    Query(max_length=64, description="a knob (dispatch, compile, ...) or receipt field"),
]
Margin = Annotated[float, Query(ge=0.0, le=0.5)]
LossTolerance = Annotated[float, Query(ge=0.0, le=1.0)]
MaybeSide = Annotated[
    str | None,
    Query(
        max_length=4200,
        description="a run id, or replicates' ids comma-separated; with `ablation`, a cell; "
        "empty: pick one",
    ),
]
Ablation = Annotated[
    str | None, Query(pattern=ID_PATTERN, description="compare two cells of this ablation")
]
# receipt field -> the knob whose value it is: a lane mismatch's links declare knobs by name
FIELD_KNOBS = {k.fields[0]: k.name for k in KNOBS.values()}


def _text(value: str | None) -> str:
    return value.strip() if value else ""


def _knobs(knob: list[str]) -> list[str]:
    return list(dict.fromkeys(k.strip() for k in knob if k.strip()))


def _choice(
    sides: dict[str, str],
    ablation: str | None,
    knob: list[str],
    allow: bool,
    margin: float,
    loss_tolerance: float,
) -> dict[str, Any]:
    return {
        **sides,
        "ablation": ablation,
        "knobs": knob,
        "allow_lane_mismatch": allow,
        "margin": margin,
        "loss_tolerance": loss_tolerance,
    }


def _data_url(request: Request, choice: dict[str, Any]) -> str:
    """The page's data address, with the choices that differ from the defaults."""
    margin, tolerance = choice["margin"], choice["loss_tolerance"]
    return pagekit.data_url(
        request,
        "/compare",
        ablation=choice["ablation"],
        baseline=choice["baseline"],
        candidate=choice["candidate"],
        knob=choice["knobs"] or None,
        allow_lane_mismatch="true" if choice["allow_lane_mismatch"] else None,
        margin=None if margin == figures.DEFAULT_MARGIN else margin,
        loss_tolerance=None if tolerance == figures.DEFAULT_LOSS_TOLERANCE else tolerance,
    )


def _cell_runs(got: AblationRead, cell: str) -> list[str]:
    """The run ids of an ablation's cell; a 404 naming the cells for one it lacks."""
    for c in got.cells:
        if c.cell == cell:
            return [r.run_id for r in c.runs]
    cells = ", ".join(c.cell for c in got.cells)
    raise NotFound(f"ablation {got.ablation_id} has no cell {cell!r} (cells: {cells})")


def _side_runs(
    session: SessionDep, request: Request, choice: dict[str, Any]
) -> tuple[dict[str, list[RunRead]], AblationRead | None]:
    """Each chosen side's runs (a side left empty: none), and the ablation where one is
    named; 404 for an unknown run, ablation or cell, 422 for a malformed side."""
    got = None
    if choice["ablation"]:
        got = ablations.read(session, cache_of(request.app.state), choice["ablation"])
    sides: dict[str, list[RunRead]] = {}
    for role in figures.ROLES:
        text = choice[role]
        if not text:
            sides[role] = []
            continue
        ids = _cell_runs(got, text) if got is not None else compare.parse_side(role, text)
        sides[role] = [runs.get_run(session, i) for i in ids]
    return sides, got


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    baseline: MaybeSide = None,
    candidate: MaybeSide = None,
    ablation: Ablation = None,
    knob: Knobs = [],  # noqa: B006 (FastAPI copies it)
    allow_lane_mismatch: bool = False,
    margin: Margin = figures.DEFAULT_MARGIN,
    loss_tolerance: LossTolerance = figures.DEFAULT_LOSS_TOLERANCE,
) -> HTMLResponse:
    sides = {"baseline": _text(baseline), "candidate": _text(candidate)}
    choice = _choice(sides, ablation, _knobs(knob), allow_lane_mismatch, margin, loss_tolerance)
    picked, got = _side_runs(session, request, choice)
    compared = all(picked.values())
    recent = runs.list_runs(session, limit=PICKER_RUNS).runs
    listed = ablations.list_ablations(session).ablations[:PICKER_ABLATIONS]
    title = "compare"
    if compared:
        title += " · " + " vs ".join(
            choice[role] if got is not None or len(picked[role]) > 1 else picked[role][0].name
            for role in figures.ROLES
        )
    return pagekit.html(
        request,
        "compare.html",
        page="compare",
        title=title,
        data_url=_data_url(request, choice) if compared else None,
        compared=compared,
        options=[pagekit.run_header(r) for r in recent],
        ablations=[{"ablation_id": a.ablation_id, "name": a.name} for a in listed],
        cells=[c.cell for c in got.cells] if got is not None else [],
        picked={role: [pagekit.run_header(r) for r in picked[role]] for role in figures.ROLES},
        choice=choice,
        knob_names=list(KNOBS),
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


def _overlays(session: SessionDep, sides: dict[str, list[RunRead]]) -> dict[str, Any]:
    """Step time, loss and drop rate of each side's runs (the first OVERLAY_RUNS a side)."""
    steps: dict[str, list[figures.RunSeries]] = {}
    drops: dict[str, list[figures.RunSeries]] = {}
    sampled: list[str] = []
    for role, side in sides.items():
        steps[role], drops[role] = [], []
        for run in side[:OVERLAY_RUNS]:
            points, dropped, was_sampled = _series(session, run)
            ends = _ends(run, _rank(run))
            steps[role].append(figures.RunSeries(run.run_id, run.name, points, ends))
            drops[role].append(figures.RunSeries(run.run_id, run.name, dropped, ends))
            if was_sampled and role not in sampled:
                sampled.append(role)
    note = "dropped / routed assignments, all E layers"
    if sampled:
        note += f"; {' and '.join(sampled)}: binned estimate (downsampled)"
    left_out = {r: len(s) - OVERLAY_RUNS for r, s in sides.items() if len(s) > OVERLAY_RUNS}
    more = "; ".join(
        f"{r}: first {OVERLAY_RUNS} runs drawn of {OVERLAY_RUNS + n}" for r, n in left_out.items()
    )
    return {
        "step_time": figures.overlay(
            "Step time", steps, lambda p: 1000.0 * float(p["step_time_s"]), "ms", more
        ),
        "loss": figures.overlay("Loss", steps, lambda p: p.get("loss"), "loss", more),
        "drop_rate": figures.overlay(
            "Drop rate (all E layers)",
            drops,
            lambda p: 100.0 * float(p["drop_rate"]),
            "% dropped",
            "; ".join(x for x in (note, more) if x),
        ),
    }


def _live(sides: dict[str, list[RunRead]]) -> dict[str, Any]:
    statuses = {run.run_id: run.status for side in sides.values() for run in side}
    live = any(s in pagekit.LIVE_STATUSES for s in statuses.values())
    ended = None if live else "every run ended: not refreshing"
    return {"live": live, "status": None, "ended": ended, "statuses": statuses}


def _verdict(result: dict[str, Any], margin: float) -> dict[str, Any]:
    """The verdict's part of the data: the verdict, its meaning and reasons, the axes, the
    ratios, badput, the summary and the lane's differing fields."""
    step_time, tokens = figures.ratio_rows(result)
    noise = result.get("run_noise")
    return {
        "verdict": {
            "verdict": result["verdict"],
            "meaning": figures.VERDICT_MEANINGS.get(result["verdict"], ""),
            "reasons": result["reasons"],
        },
        "figures": {
            "ratios": figures.ratio_forest(result, margin),
            "badput": figures.badput_bars(result),
        },
        "tables": {
            "axes": tables.axes_table(result.get("axes") or ()),
            "summary": tables.summary_table(result),
            "lane_diff": tables.lane_table(result["lane_diff"], result["knob_fields"]),
        },
        "texts": {
            "ratio-step_time": figures.ratio_text(step_time),
            "ratio-tokens": figures.ratio_text(tokens),
            "run-noise": "–" if noise is None else f"±{noise:.1%}",
            "replicates": f"{result['runs']['baseline']} vs {result['runs']['candidate']}",
        },
    }


def _refusal(
    request: Request,
    detail: dict[str, Any],
    sides: dict[str, list[RunRead]],
    choice: dict[str, Any],
) -> dict[str, Any]:
    """The refusal's part of the data: why, what each run lacks or where they differ, and
    the links that would give a verdict; the verdict's charts say there is none."""
    parts = ("model_plan", "runtime_policy", "environment")
    runs_view = {
        role: [
            {"run_id": r.run_id, "name": r.name, "parts": {k: getattr(r, k) for k in parts}}
            for r in side
        ]
        for role, side in sides.items()
    }
    view = tables.refusal_view(detail, runs_view, choice, pagekit.root(request), FIELD_KNOBS)
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
    baseline: CompareSide,
    candidate: CompareSide,
    ablation: Ablation = None,
    knob: Knobs = [],  # noqa: B006 (FastAPI copies it)
    allow_lane_mismatch: bool = False,
    margin: Margin = figures.DEFAULT_MARGIN,
    loss_tolerance: LossTolerance = figures.DEFAULT_LOSS_TOLERANCE,
) -> Response:
    """The verdict, or the refusal with what would fix it (a 200 either way), and every
    run's series overlaid."""
    knobs = _knobs(knob)
    sides_text = {"baseline": _text(baseline), "candidate": _text(candidate)}
    choice = _choice(sides_text, ablation, knobs, allow_lane_mismatch, margin, loss_tolerance)
    sides, _ = _side_runs(session, request, choice)
    fleet = cache_of(request.app.state)
    live = _live(sides)  # every run of a cell counts, not only the completed ones compared
    shown_knobs = knobs
    try:
        if ablation:
            result = compare.compare_cells(
                session, fleet, ablation, sides_text["baseline"], sides_text["candidate"],
                knobs, allow_lane_mismatch=allow_lane_mismatch, margin=margin,
                loss_tolerance=loss_tolerance,
            )  # fmt: skip
        else:
            result = compare.compare_sets(
                session,
                fleet,
                [r.run_id for r in sides["baseline"]],
                [r.run_id for r in sides["candidate"]],
                knobs,
                allow_lane_mismatch=allow_lane_mismatch,
                margin=margin,
                loss_tolerance=loss_tolerance,
                asked=(sides_text["baseline"], sides_text["candidate"]),
            )
    except Refused as refused:
        part = _refusal(request, refused.detail, sides, choice)
    else:
        part = _verdict(result.model_dump(), margin)
        shown_knobs = result.knobs
        if ablation:  # the runs compared: a cell's completed ones
            compared = {"baseline": result.baseline_runs, "candidate": result.candidate_runs}
            sides = {
                role: [r for r in side if r.run_id in compared[role]]
                for role, side in sides.items()
            }
    return pagekit.data(
        {
            **live,
            "verdict": part.get("verdict"),
            "refusal": part.get("refusal"),
            "figures": {**_overlays(session, sides), **part["figures"]},
            "tables": part["tables"],
            "texts": {"knobs": ", ".join(shown_knobs) or "none declared", **part["texts"]},
        }
    )
