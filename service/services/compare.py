"""Keep/drop: a candidate run against a baseline, from their receipts and newest steps."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.calc.compare import COMPARE_STEPS, RunFigures, compare, lane_diff, unexplained
from service.schemas import CompareRead, Pair, RatioRead, ReceiptRead
from service.services.errors import Refused
from service.services.receipts import receipt
from service.store.rollups import read as rollup_read

# Receipt fields that say nothing about the lane: how the process was started.
INCIDENTAL = ("environment.argv0",)


def _figures(session: Session, got: ReceiptRead) -> RunFigures:
    """The newest COMPARE_STEPS steps of the last attempt of the receipt's reference rank, in
    step order (the bootstrap's cost grows with the steps; its answer barely does)."""
    rank = got.summary.throughput.rank or 0
    mine = rollup_read.newest_attempt_steps(session, got.run_id, rank, COMPARE_STEPS)
    return RunFigures(
        step_times_s=[s.end - s.start for s in mine],
        tokens=[s.tokens for s in mine],
        goodput_fraction=got.summary.goodput.goodput_fraction,
        badput_s=got.summary.goodput.badput_s,
        peak_memory_bytes=got.summary.throughput.peak_memory_bytes,
        final_loss=got.summary.throughput.final_loss,
    )


def _lane(got: ReceiptRead) -> dict[str, Any]:
    return {
        "model_plan": got.model_plan,
        "runtime_policy": got.runtime_policy,
        "environment": got.environment,
    }


def _refuse_incomplete(base: ReceiptRead, cand: ReceiptRead) -> None:
    if base.complete and cand.complete:
        return
    raise Refused(
        {
            "error": "incomplete_receipt",
            "message": "a keep/drop verdict needs two complete receipts",
            "missing": {"baseline": base.missing, "candidate": cand.missing},
        }
    )


def compare_runs(
    session: Session,
    baseline: str,
    candidate: str,
    knob: list[str],
    allow_lane_mismatch: bool = False,
    margin: float = 0.02,
    loss_tolerance: float = 0.01,
) -> CompareRead:
    """Steady-state step time and tokens/s ratios with bootstrap intervals, goodput and
    badput side by side, peak memory, final loss, the lane's differing fields, a verdict.
    Refused for an incomplete receipt, or lanes that differ beyond the `knob` fields."""
    base, cand = receipt(session, baseline), receipt(session, candidate)
    _refuse_incomplete(base, cand)
    diff = lane_diff(_lane(base), _lane(cand), ignore_prefixes=INCIDENTAL)
    extra = unexplained(diff, knob)
    if extra and not allow_lane_mismatch:
        raise Refused(
            {
                "error": "lane_mismatch",
                "message": "the runs differ beyond the declared knob(s); name each field with "
                "knob= or pass allow_lane_mismatch=true",
                "fields": extra,
            }
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
