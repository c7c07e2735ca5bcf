"""GET /api/v1/compare: keep/drop comparison of a candidate run against a baseline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from service import repository_rollups as rollups
from service.api import RunIdQuery, SessionDep
from service.api_receipts import get_receipt
from service.compare import COMPARE_STEPS, RunFigures, compare, lane_diff, unexplained
from service.schemas import RUN_ERRORS, CompareRefusal, ReceiptRead, error_response, errors

router = APIRouter(prefix="/api/v1")

# Receipt fields that say nothing about the lane: how the process was started.
INCIDENTAL = ("environment.argv0",)


class RatioRead(BaseModel):
    value: float | None = Field(description="candidate / baseline, ratio of medians")
    low: float | None = Field(description="95% bootstrap interval, low end")
    high: float | None = Field(description="95% bootstrap interval, high end")


class Pair(BaseModel):
    baseline: Any
    candidate: Any


class CompareRead(BaseModel):
    baseline: str
    candidate: str
    verdict: str = Field(description="keep, drop or inconclusive")
    reasons: list[str]
    step_time_ratio: RatioRead
    tokens_per_s_ratio: RatioRead
    steady_steps: Pair
    goodput_fraction: Pair
    badput_s: dict[str, Pair]
    peak_memory_bytes: Pair
    final_loss: Pair
    lane_diff: dict[str, Pair]
    knobs: list[str]


def _figures(session: Session, receipt: ReceiptRead) -> RunFigures:
    """The newest COMPARE_STEPS steps of the last attempt of the receipt's reference rank, in
    step order (the bootstrap's cost grows with the steps; its answer barely does)."""
    rank = receipt.summary.throughput.rank or 0
    mine = rollups.newest_attempt_steps(session, receipt.run_id, rank, COMPARE_STEPS)
    return RunFigures(
        step_times_s=[s.end - s.start for s in mine],
        tokens=[s.tokens for s in mine],
        goodput_fraction=receipt.summary.goodput.goodput_fraction,
        badput_s=receipt.summary.goodput.badput_s,
        peak_memory_bytes=receipt.summary.throughput.peak_memory_bytes,
        final_loss=receipt.summary.throughput.final_loss,
    )


def _lane(receipt: ReceiptRead) -> dict[str, Any]:
    return {
        "model_plan": receipt.model_plan,
        "runtime_policy": receipt.runtime_policy,
        "environment": receipt.environment,
    }


def _refuse_incomplete(base: ReceiptRead, cand: ReceiptRead) -> None:
    if base.complete and cand.complete:
        return
    raise HTTPException(
        409,
        detail={
            "error": "incomplete_receipt",
            "message": "a keep/drop verdict needs two complete receipts",
            "missing": {"baseline": base.missing, "candidate": cand.missing},
        },
    )


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
    base, cand = get_receipt(baseline, session), get_receipt(candidate, session)
    _refuse_incomplete(base, cand)
    diff = lane_diff(_lane(base), _lane(cand), ignore_prefixes=INCIDENTAL)
    extra = unexplained(diff, knob)
    if extra and not allow_lane_mismatch:
        raise HTTPException(
            409,
            detail={
                "error": "lane_mismatch",
                "message": "the runs differ beyond the declared knob(s); name each field with "
                "knob= or pass allow_lane_mismatch=true",
                "fields": extra,
            },
        )
    b, c = _figures(session, base), _figures(session, cand)
    result = compare(b, c, margin=margin, loss_tolerance=loss_tolerance)
    categories = sorted(set(b.badput_s) | set(c.badput_s))
    return CompareRead(
        baseline=baseline,
        candidate=candidate,
        verdict=result.verdict,
        reasons=result.reasons,
        step_time_ratio=RatioRead(**result.step_time_ratio.__dict__),
        tokens_per_s_ratio=RatioRead(**result.tokens_per_s_ratio.__dict__),
        steady_steps=Pair(baseline=result.steady_steps[0], candidate=result.steady_steps[1]),
        goodput_fraction=Pair(baseline=b.goodput_fraction, candidate=c.goodput_fraction),
        badput_s={
            k: Pair(baseline=b.badput_s.get(k), candidate=c.badput_s.get(k)) for k in categories
        },
        peak_memory_bytes=Pair(baseline=b.peak_memory_bytes, candidate=c.peak_memory_bytes),
        final_loss=Pair(baseline=b.final_loss, candidate=c.final_loss),
        lane_diff={k: Pair(**v) for k, v in diff.items()},
        knobs=list(knob),
    )
