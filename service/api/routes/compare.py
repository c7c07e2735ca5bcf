"""GET /api/v1/compare: keep/drop comparison of a candidate run against a baseline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.api.deps import RunIdQuery, SessionDep
from service.api.errors import RUN_ERRORS, error_response, errors
from service.schemas import CompareRead, CompareRefusal
from service.services import compare

router = APIRouter(prefix="/api/v1")

_COMPARE_ERRORS: dict[int | str, dict[str, Any]] = {
    **errors(*RUN_ERRORS),
    409: error_response(
        409,
        "no verdict: a receipt is incomplete (`incomplete_receipt`, what each lacks) or the "
        "lanes differ beyond the `knob` fields (`lane_mismatch`, the fields)",
        CompareRefusal,
    ),
}


@router.get("/compare", response_model=CompareRead, responses=_COMPARE_ERRORS)
def compare_runs(
    session: SessionDep,
    baseline: RunIdQuery,
    candidate: RunIdQuery,
    knob: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006 (FastAPI copies it)
    allow_lane_mismatch: bool = False,
    margin: Annotated[float, Query(ge=0.0, le=0.5)] = 0.02,
    loss_tolerance: Annotated[float, Query(ge=0.0, le=1.0)] = 0.01,
) -> CompareRead:
    """Keep/drop: steady-state step time and tokens/s ratios with bootstrap intervals, goodput
    and badput side by side, peak memory, final loss, the lane's differing fields, a verdict.
    Refused (409) for an incomplete receipt, or lanes that differ beyond the `knob` fields."""
    return compare.compare_runs(
        session,
        baseline,
        candidate,
        knob,
        allow_lane_mismatch=allow_lane_mismatch,
        margin=margin,
        loss_tolerance=loss_tolerance,
    )
