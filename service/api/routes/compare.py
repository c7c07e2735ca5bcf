"""GET /api/v1/compare: keep/drop, a candidate against a baseline (runs, or replicates)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from service.api.deps import CompareSide, SessionDep
from service.api.errors import RUN_ERRORS, error_response, errors
from service.schemas import CompareRead, CompareRefusal
from service.services import compare
from service.services.fleet import cache_of
from trainer_hooks.records import ID_PATTERN

router = APIRouter(prefix="/api/v1")

_COMPARE_ERRORS: dict[int | str, dict[str, Any]] = {
    **errors(*RUN_ERRORS),
    409: error_response(
        409,
        "no verdict: a receipt is incomplete (`incomplete_receipt`, what each lacks), a side's "
        "runs are not replicates of one lane (`replicates_differ`), or the sides differ beyond "
        "the `knob` fields (`lane_mismatch`, the fields)",
        CompareRefusal,
    ),
}


@router.get("/compare", response_model=CompareRead, responses=_COMPARE_ERRORS)
def compare_runs(
    session: SessionDep,
    request: Request,
    baseline: CompareSide,
    candidate: CompareSide,
    knob: Annotated[
        list[str],
        Query(max_length=64, description="a knob (GET /api/v1/knobs) or receipt field"),
    ] = [],  # noqa: B006 (FastAPI copies it)
    ablation: Annotated[
        str | None,
        Query(pattern=ID_PATTERN, description="compare two cells of this ablation"),
    ] = None,
    allow_lane_mismatch: bool = False,
    margin: Annotated[float, Query(ge=0.0, le=0.5)] = 0.02,
    loss_tolerance: Annotated[float, Query(ge=0.0, le=1.0)] = 0.01,
) -> CompareRead:
    """Keep/drop: speed (step time, tokens/s), quality (eval loss at matched steps),
    goodput and badput mix, peak memory and routing (drop rate, MaxVio), each with its 95%
    interval over the runs (replicates) and their steps, and a verdict (keep, tax, drop,
    inconclusive) with its reasons. Each side is one run or several replicates; or, with
    `ablation`, two of its cells (their completed runs, the ablation's knobs declared).
    Refused (409) for an incomplete receipt, replicates of mixed lanes, or sides that
    differ beyond the knobs' fields; an unknown knob is a 422 listing the known ones."""
    fleet = cache_of(request.app.state)
    if ablation is not None:
        return compare.compare_cells(
            session,
            fleet,
            ablation,
            baseline,
            candidate,
            knob,
            allow_lane_mismatch=allow_lane_mismatch,
            margin=margin,
            loss_tolerance=loss_tolerance,
        )
    return compare.compare_sets(
        session,
        fleet,
        compare.parse_side("baseline", baseline),
        compare.parse_side("candidate", candidate),
        knob,
        allow_lane_mismatch=allow_lane_mismatch,
        margin=margin,
        loss_tolerance=loss_tolerance,
        asked=(baseline, candidate),
    )
